"""Random leaves, targets and option sets that several path tests draw alike.

`make_inputs`, `OPTIONS` and `TOL` serve the torch backend's checks of the memory-first and
token-chunked paths; `weighted_inputs` the class-weight and fast-mode statistics checks. Every
draw comes from torch's global generator, which conftest.py seeds from the test's id.
"""

from __future__ import annotations

import math

import torch

IGNORE = -100

# (loss tolerance, gradient tolerance), relative, for impl="torch". The loss is computed in float32
# (float64 for float64 inputs) from the given values, so it is accurate for every dtype; gradients
# are stored in the input dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.bfloat16: (2e-6, 1.2e-2),
    torch.float16: (2e-6, 2e-3),
}

OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "label_smoothing": {"label_smoothing": 0.15},
    "z_loss": {"z_loss": 1e-2},
    "all": {"bias": True, "softcap": 3.0, "label_smoothing": 0.1, "z_loss": 2e-3},
}


def make_inputs(n, d, v, dtype, *, bias=False, ignore_frac=0.2, lead=None, scale=2.0):
    """(e, c, targets, bias): leaf tensors in `dtype` with logits of standard deviation about
    `scale`; e is [*lead, d] (or [n, d]), a fraction `ignore_frac` of the targets is IGNORE."""
    shape = (n,) if lead is None else tuple(lead)
    e = torch.randn(*shape, d, dtype=torch.float64)
    c = torch.randn(v, d, dtype=torch.float64) * (scale / math.sqrt(d))
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    targets = torch.randint(0, v, shape)
    if ignore_frac:
        targets[torch.rand(shape) < ignore_frac] = IGNORE
    e = e.to(dtype).requires_grad_()
    c = c.to(dtype).requires_grad_()
    if b is not None:
        b = b.to(dtype).requires_grad_()
    return e, c, targets, b


def split_options(opts):
    """(whether the option set wants a bias, the library's keyword arguments)."""
    opts = dict(opts)
    want_bias = opts.pop("bias", False)
    return want_bias, opts


def weighted_inputs(n, d, v, dtype=torch.float64, bias=False, ignore_every=4, scale=2.0):
    """[e, c, bias] leaves in `dtype` (logits std ≈ scale; bias None unless asked), targets [n] with
    every `ignore_every`-th ignored, and class weights [v] in [0.1, 2.1) (float64)."""
    e = torch.randn(n, d, dtype=torch.float64)
    c = torch.randn(v, d, dtype=torch.float64) * scale / d**0.5
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, (n,))
    if ignore_every:
        t[::ignore_every] = -100
    w = torch.rand(v, dtype=torch.float64) * 2 + 0.1
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (e, c, b)], t, w
