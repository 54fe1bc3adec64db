"""Test helper: which of the fast mode's two Functions ran (their path modules resolve them at call time)."""

from __future__ import annotations

from vocab_parallel_cce.paths import chunked, held

PATHS = {"LossWithGradInForward": "chunked", "LossWithHeldLogits": "held"}
MODULES = {"LossWithGradInForward": chunked, "LossWithHeldLogits": held}


class CountFast:
    """Records each run of the fast mode's Functions in `paths`: "held" (LossWithHeldLogits: one
    chunk, the logits held to the backward) or "chunked" (LossWithGradInForward: token chunks,
    gradients in the forward)."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        for name, tag in PATHS.items():
            real = getattr(MODULES[name], name)

            def forward(ctx, *args, _real=real, _tag=tag):
                self.paths.append(_tag)
                return _real.forward(ctx, *args)

            counted = type("Counted" + name, (real,), {"forward": staticmethod(forward)})
            monkeypatch.setattr(MODULES[name], name, counted)

    @property
    def calls(self) -> int:
        return len(self.paths)

    def clear(self) -> None:
        self.paths.clear()


def fast_path_of(loss) -> str:
    """"held", "chunked", "memory-first" or "no autograd", from the loss's grad_fn."""
    fn = loss.grad_fn
    if fn is None:
        return "no autograd"
    while type(fn).__name__.startswith(("View", "Slice", "Reshape", "Alias")):  # "none"'s reshapes
        fn = fn.next_functions[0][0]
    name = type(fn).__name__.removeprefix("Counted")  # CountFast's subclasses
    for cls, tag in PATHS.items():
        if name.startswith(cls):
            return tag
    return "memory-first"
