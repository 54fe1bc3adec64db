"""Helpers the test modules share; none of these modules holds tests.

    reference         the float64 oracle (materialised logits, written from the definition)
    inputs            random leaves, targets and option sets that several path tests draw alike
    fast_mode         which of the fast mode's paths a call ran (held logits, token chunks)
    interpreter       set-up for the Triton kernels on CPU under TRITON_INTERPRET=1
    process_groups    gloo (or NCCL) process groups started from pytest, each rank's results
    megatron_cpu      megatron-core on CPU: CUDA stand-ins, a tiny GPTModel, a forking rank starter
    grad_e_precision  dE under tensor parallelism against float64 (cases for the groups; a script)

tests/conftest.py puts tests/ on sys.path, so `support` imports the same way in every test module,
in pytest-xdist workers and in ranks started by `process_groups.run_group`.
"""
