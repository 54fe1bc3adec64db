"""The compute backends behind the paths: `torch_backend` (exact, any device) and `triton` (the
kernels); both implement `protocol.Backend`."""
