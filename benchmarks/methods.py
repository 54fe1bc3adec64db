"""The methods the suites time: ours (under any `vocab_parallel_cce.Tuning`) and the peers.

A `Method` is `fn(e [N, D], c [V, D], targets [N]) → mean loss` (a float scalar) with what it needs
(CUDA, a package) and, when it cannot run here, why. `build_method(name, tuning_spec)` makes one by
its registry name; a missing package gives a method that is skipped with the import error, never an
exception. The reference rows `cublas_3x` / `cublas_4x` are not methods: `timing.CublasProducts`.

Ours: `vpcce_triton` (defaults: the fast mode), `vpcce_triton_memory` (`grad_in_forward=False`), and
variants; `vpcce_torch*` run the torch path (CPU too). `*_into` methods add c's gradient into a
float32 `main_grad` (`dc_accumulate_into`, as under Megatron) made once per shape outside the timed
call; the suites time and check them through `Method.fwd_bwd` / `Method.loss_and_grads`. Peers: torch.compile and eager of
`F.cross_entropy((e @ c.T).float(), t)`, PyTorch's `F.linear_cross_entropy` where present, Liger-Kernel's
FLCE, Apple's Cut Cross-Entropy, Megatron-core's fused vocab-parallel cross-entropy.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from tables import short_error


@dataclass
class Method:
    """A loss implementation: `fn(e [N, D], c [V, D], targets [N]) → mean loss` (float scalar)."""

    name: str
    fn: Callable | None
    needs_cuda: bool = False
    max_nv: float | None = None  # skip when N·V is larger (slow reference paths)
    skip_reason: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)
    main_grads: dict | None = None  # c's shape → the float32 target c's gradient goes into (`*_into`)

    def usable(self, device: torch.device, n: int, v: int) -> tuple[bool, str]:
        if self.fn is None:
            return False, self.skip_reason or "unavailable"
        if self.needs_cuda and torch.device(device).type != "cuda":
            return False, "needs CUDA"
        if self.max_nv is not None and n * v > self.max_nv:
            return False, f"N·V = {n * v:.3g} > {self.max_nv:.3g} (slow path; raise with --max-nv)"
        return True, ""

    def __call__(self, e, c, t):
        return self.fn(e, c, t)

    def fwd_bwd(self, e_g, c_g, t):
        """One timed forward+backward: the gradients of e and c (of e alone for a `*_into` method,
        whose c gradient goes into its main_grad)."""
        wrt = (e_g,) if self.main_grads is not None else (e_g, c_g)
        return torch.autograd.grad(self(e_g, c_g, t), wrt)

    def loss_and_grads(self, e_g, c_g, t):
        """(loss, dE, dC) of one call; for a `*_into` method dC is what one call adds into its
        main_grad (zeroed first)."""
        if self.main_grads is None:
            loss = self(e_g, c_g, t)
            return (loss, *torch.autograd.grad(loss, (e_g, c_g)))
        target = main_grad(self.main_grads, c_g)
        target.zero_()
        loss = self(e_g, c_g, t)
        (de,) = torch.autograd.grad(loss, (e_g,))
        return loss, de, target


def main_grad(store: dict, c: torch.Tensor) -> torch.Tensor:
    """The float32 target of c's shape and device in `store` (made on first use; one kept)."""
    key = (tuple(c.shape), str(c.device))
    if key not in store:
        store.clear()
        store[key] = torch.zeros(c.shape, dtype=torch.float32, device=c.device)
    return store[key]


def tuning_type():
    """The library's `Tuning` class (None, with the reason, when this version has none)."""
    try:
        import vocab_parallel_cce as lib

        return lib.Tuning, ""
    except Exception as err:  # noqa: BLE001
        return None, short_error(err)


def _tuning_value(name: str, annotation: str, default, raw: str):
    """`raw` as a value of the Tuning field `name`, from its annotation (a string under
    `from __future__ import annotations`) and default: 'none' → None; bool → 0/1/true/false; a
    block config (tuple) → comma-separated ints; float; int."""
    text = str(annotation)
    low = raw.strip().lower()
    if low == "none":
        return None
    if "bool" in text or isinstance(default, bool):
        if low not in ("0", "1", "true", "false"):
            raise ValueError(f"--tuning {name}={raw}: expected 0/1/true/false/none")
        return low in ("1", "true")
    if "Block" in text or "tuple" in text or isinstance(default, tuple):
        return tuple(int(x) for x in raw.split(","))
    if "float" in text or isinstance(default, float):
        return float(raw)
    if "int" in text or isinstance(default, int):
        return int(raw)
    raise ValueError(f"--tuning {name}={raw}: cannot tell the type of this field ({text})")


def parse_tuning(spec: str):
    """'group_v=8 use_tma=0' (fields separated by spaces or ';') → `Tuning(group_v=8, use_tma=False)`.

    Any field of the installed `Tuning` works, by its type: block configs as comma-separated ints
    ('grad_block=128,256,64,8,3'), booleans and optional booleans as 0/1/true/false/none, floats,
    ints; 'none' for None. A bad field or value raises ValueError naming it.
    """
    from dataclasses import MISSING, fields

    cls, why = tuning_type()
    if cls is None:
        raise ValueError(f"--tuning: the installed vocab_parallel_cce has no Tuning ({why})")
    known = {f.name: f for f in fields(cls)}
    kw = {}
    for item in spec.replace(";", " ").split():
        name, sep, raw = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--tuning {spec!r}: expected FIELD=VALUE with FIELD one of {sorted(known)}, got {item!r}")
        f = known[name]
        default = None if f.default is MISSING else f.default
        try:
            kw[name] = _tuning_value(name, f.type, default, raw)
        except ValueError as err:
            raise ValueError(f"--tuning {item!r}: {err}") from None
    if not kw:
        raise ValueError(f"--tuning {spec!r}: expected at least one FIELD=VALUE")
    return cls(**kw)


def _accepts_tuning(fn) -> bool:
    import inspect

    try:
        return "tuning" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


LIBRARY_DEFAULT = "library default"  # an argument _ours leaves out of the call


def _ours(impl: str, name: str, filter_eps=LIBRARY_DEFAULT, grad_in_forward=LIBRARY_DEFAULT, tuning=None,
          tuning_spec: str = "", into_main_grad: bool = False) -> Method:
    """`linear_cross_entropy(e, c, t, impl=impl, ...)` with `filter_eps` (None: dense, "auto":
    adaptive dC tile skipping, a number: always skip) and `grad_in_forward` (True: the fast mode,
    False: memory-first) where given, a `Tuning` (`tuning=`), and with `into_main_grad`
    `dc_accumulate_into` a float32 target of c's shape (`Method.main_grads`)."""
    try:
        from vocab_parallel_cce import linear_cross_entropy
    except Exception as err:  # noqa: BLE001
        return Method(name, None, skip_reason=short_error(err))
    kw = {k: v for k, v in (("filter_eps", filter_eps), ("grad_in_forward", grad_in_forward))
          if v != LIBRARY_DEFAULT}
    if tuning is not None:
        if not _accepts_tuning(linear_cross_entropy):
            return Method(name, None, skip_reason="this vocab_parallel_cce's linear_cross_entropy takes no tuning=")
        kw["tuning"] = tuning

    targets = {} if into_main_grad else None

    def fn(e, c, t):
        if targets is not None:
            return linear_cross_entropy(e, c, t, impl=impl, dc_accumulate_into=main_grad(targets, c), **kw)
        return linear_cross_entropy(e, c, t, impl=impl, **kw)

    notes = [f"{k}={v if not isinstance(v, float) else format(v, 'g')}" for k, v in kw.items() if k != "tuning"]
    if into_main_grad:
        notes.append("dc_accumulate_into=main_grad (float32)")
    if tuning_spec:
        notes.append(f"Tuning({tuning_spec})")
    note = f"linear_cross_entropy(impl={impl!r}" + "".join(f", {x}" for x in notes) + ")"
    if impl.startswith("triton"):
        try:
            import triton  # noqa: F401  (its absence is a skip reason, not an error in a call)
        except Exception as err:  # noqa: BLE001
            return Method(name, None, skip_reason=f"triton missing ({short_error(err)})")
        return Method(name, fn, needs_cuda=True, note=note, extra={"adaptive": filter_eps == "auto", "tuning": tuning},
                      main_grads=targets)
    return Method(name, fn, max_nv=2.0**28, note=note, main_grads=targets)


def _torch_eager() -> Method:
    def fn(e, c, t):
        logits = e @ c.T
        return F.cross_entropy(logits.float(), t)

    return Method("torch_eager", fn, note="logits = e @ c.T; F.cross_entropy(logits.float(), t)")


def _torch_compile() -> Method:
    def loss(e, c, t):
        logits = e @ c.T
        return F.cross_entropy(logits.float(), t)

    # dynamic=False specialises (recompiles) per shape and per grad mode: 2 per shape. Past dynamo's
    # recompile limit (8) it would silently run eager, so raise it for the suites' 6 shapes.
    import torch._dynamo

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    compiled = torch.compile(loss, dynamic=False)
    return Method("torch_compile", compiled, note="torch.compile of torch_eager, dynamic=False")


def _torch_linear_ce() -> Method:
    """torch.nn.functional.linear_cross_entropy (torch ≥ 2.12), with its chunked path
    (`options=torch.nn.LinearCrossEntropyOptions()`) where the installed torch has it."""
    flce = getattr(F, "linear_cross_entropy", None)
    if flce is None:
        return Method("torch_linear_ce", None,
                      skip_reason=f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kw = {} if options_cls is None else {"options": options_cls()}

    def fn(e, c, t):
        return flce(e, c, t, **kw)

    how = "options=LinearCrossEntropyOptions() (chunked)" if kw else "reference path"
    return Method("torch_linear_ce", fn, note=f"torch {torch.__version__} F.linear_cross_entropy, {how}")


_SINGLE_GROUP: dict = {}


def single_process_group(device: torch.device):
    """A process group of this process alone (NCCL on CUDA, gloo on CPU), made once; the world
    group when torch.distributed is already initialised with one process."""
    import socket

    import torch.distributed as dist

    key = torch.device(device).type
    if key in _SINGLE_GROUP:
        return _SINGLE_GROUP[key]
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if key == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        group = dist.group.WORLD
    elif dist.get_world_size() == 1:
        group = dist.group.WORLD
    else:
        raise RuntimeError("torch.distributed already has several ranks; run this method in a single process")
    _SINGLE_GROUP[key] = group
    return group


def _megatron_fused() -> Method:
    """Megatron-core's fused vocab-parallel cross-entropy on materialised logits e @ c.T (the
    input dtype, as Megatron's output layer gives), with a group of one process."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy as ce
        from importlib.metadata import version as _v

        version = _v("megatron-core")
    except Exception as err:  # noqa: BLE001
        return Method("megatron_fused", None, skip_reason=short_error(err))

    def fn(e, c, t):
        group = single_process_group(e.device)
        logits = e @ c.T
        # Megatron's layout: logits [s, b, V], targets [s, b] (here b = 1).
        return ce(logits[:, None, :], t[:, None], group).mean()

    return Method("megatron_fused", fn, note=f"megatron-core {version} fused_vocab_parallel_cross_entropy "
                                               "on bf16 logits e @ c.T, 1-process group")


def _liger() -> Method:
    try:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
        except Exception:  # noqa: BLE001  (older/newer layouts: use the autograd Function directly)
            flce = None
        if flce is None:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def flce(input, weight, target):  # noqa: A002
                return LigerFusedLinearCrossEntropyFunction.apply(input, weight, target)[0]
        import liger_kernel

        version = getattr(liger_kernel, "__version__", None)
        if version is None:
            from importlib.metadata import version as _v

            version = _v("liger-kernel")
    except Exception as err:  # noqa: BLE001
        return Method("liger", None, skip_reason=short_error(err))

    def fn(e, c, t):
        out = flce(e, c, t)
        return out[0] if isinstance(out, tuple) else out

    return Method("liger", fn, needs_cuda=True, note=f"liger-kernel {version} FLCE (defaults)")


def _apple(exact: bool) -> Method:
    name = "apple_cce_exact" if exact else "apple_cce"
    try:
        import cut_cross_entropy as cce
    except Exception as err:  # noqa: BLE001
        return Method(name, None, skip_reason=short_error(err))
    version = getattr(cce, "__version__", "?")
    impls = {m.name.lower() for m in getattr(cce, "LinearCrossEntropyImpl", [])}
    if not exact:
        def fn(e, c, t):
            return cce.linear_cross_entropy(e, c, t, impl="cce")
        note = f"cut-cross-entropy {version} impl=cce"
    elif "cce_exact" in impls:
        def fn(e, c, t):
            return cce.linear_cross_entropy(e, c, t, impl="cce_exact")
        note = f"cut-cross-entropy {version} impl=cce_exact"
    else:
        def fn(e, c, t):
            return cce.linear_cross_entropy(e, c, t, impl="cce", filter_eps=None)
        note = f"cut-cross-entropy {version} has no cce_exact: impl=cce, filter_eps=None"
    return Method(name, fn, needs_cuda=True, note=note)


# Ours: registry name → _ours arguments. Each also takes a Tuning (the suites' --tuning rows).
OURS = {
    "vpcce_triton": dict(impl="triton"),
    "vpcce_triton_memory": dict(impl="triton", grad_in_forward=False),
    "vpcce_triton_gif": dict(impl="triton", grad_in_forward=True),
    "vpcce_triton_exact": dict(impl="triton_exact"),
    "vpcce_triton_dense": dict(impl="triton", filter_eps=None, grad_in_forward=False),
    "vpcce_triton_auto": dict(impl="triton", filter_eps="auto", grad_in_forward=False),
    "vpcce_triton_filter": dict(impl="triton", filter_eps=2.0**-12, grad_in_forward=False),
    "vpcce_triton_filter14": dict(impl="triton", filter_eps=2.0**-14, grad_in_forward=False),
    "vpcce_torch": dict(impl="torch"),
    "vpcce_torch_memory": dict(impl="torch", grad_in_forward=False),
    "vpcce_torch_gif": dict(impl="torch", grad_in_forward=True),
    "vpcce_triton_memory_into": dict(impl="triton", grad_in_forward=False, into_main_grad=True),
    "vpcce_triton_into": dict(impl="triton", into_main_grad=True),
    "vpcce_torch_memory_into": dict(impl="torch", grad_in_forward=False, into_main_grad=True),
}
PEERS: dict[str, Callable[[], Method]] = {
    "torch_compile": _torch_compile,
    "torch_eager": _torch_eager,
    "torch_linear_ce": _torch_linear_ce,
    "liger": _liger,
    "apple_cce": lambda: _apple(False),
    "apple_cce_exact": lambda: _apple(True),
    "megatron_fused": _megatron_fused,
}
TUNABLE = OURS  # kept as a name: "the methods --tuning applies to"
# Reference rows: timed cuBLAS products (timing.CublasProducts), not losses.
REFERENCE_ROWS = ("cublas_3x", "cublas_4x")
DEFAULT_METHODS = ["vpcce_triton", "vpcce_triton_memory", "torch_compile", "torch_eager", "liger", "apple_cce",
                   "megatron_fused", "torch_linear_ce", "cublas_3x", "cublas_4x"]


def build_method(name: str, tuning_spec: str | None = None) -> Method:
    """The method `name`; with `tuning_spec` ('field=value ...'), our method under that Tuning,
    named 'name[spec]'."""
    if tuning_spec:
        label = f"{name}[{tuning_spec}]"
        if name not in OURS:
            raise ValueError(f"--tuning applies to {sorted(OURS)}, not {name!r}")
        try:
            tuning = parse_tuning(tuning_spec)
        except ValueError as err:
            return Method(label, None, skip_reason=str(err))
        return _ours(name=label, tuning=tuning, tuning_spec=tuning_spec, **OURS[name])
    if name not in OURS and name not in PEERS:
        raise ValueError(f"unknown method {name!r}; known: {known_names()}")
    try:
        return _ours(name=name, **OURS[name]) if name in OURS else PEERS[name]()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return Method(name, None, skip_reason=short_error(err))



def known_names() -> list[str]:
    return list(OURS) + list(PEERS) + list(REFERENCE_ROWS)


def add_selection_args(p, shapes: list[str], all_shapes: list[str], kinds: list[str], methods: list[str],
                       tuning_help: str) -> None:
    """The options that select a suite's cases and rows: --shapes, --kinds, --methods, --tuning."""
    from inputs import KINDS

    p.add_argument("--shapes", default=",".join(shapes), help=f"comma list of NxDxV, or 'all' ({','.join(all_shapes)})")
    p.add_argument("--kinds", default=",".join(kinds), help=f"comma list of {KINDS}")
    p.add_argument("--methods", default=",".join(methods), help=f"comma list of {known_names()}")
    p.add_argument("--tuning", action="append", default=[], metavar="'FIELD=VALUE ...'", help=tuning_help)


def method_specs(methods: str, tunings: list[str]) -> list[tuple[str, str | None]]:
    """(registry name, tuning spec or None) of every row a suite runs, in order: the `methods`
    (comma list), then each `--tuning` spec applied to each of ours among them. Unknown names and
    bad specs raise SystemExit naming them, before any work starts."""
    names = [m for m in methods.split(",") if m]
    for name in names:
        if name not in known_names():
            raise SystemExit(f"--methods: unknown method {name!r}; known: {known_names()}")
    for spec in tunings:
        try:
            parse_tuning(spec)
        except (ValueError, TypeError) as err:
            raise SystemExit(str(err)) from None
        if not any(n in OURS for n in names):
            raise SystemExit(f"--tuning {spec!r}: none of --methods is ours ({sorted(OURS)})")
    return [(n, None) for n in names] + [(n, s) for s in tunings for n in names if n in OURS]
