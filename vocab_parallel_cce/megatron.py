"""Megatron-core adapter: make a GPTModel's training loss use the fused vocabulary-parallel loss.

    from vocab_parallel_cce.megatron import patch_gpt_model
    model = patch_gpt_model(GPTModel(...), label_smoothing=0.0)   # before or after DDP wrapping

After the call, `model(input_ids, position_ids, attention_mask, labels=labels)` returns the
per-token loss [b, s] (float32) exactly as before (loss_mask and the reduction stay in the user's
loss function), but computed from the hidden states and the classifier shard of each
tensor-parallel rank without materialising logits. Without labels (or in inference) the model
returns logits exactly as before: that path is not touched.

How it hooks in (per model instance; nothing global is changed):

* megatron-core >= 0.18 (GPTModel.forward has `output_processor`): the main head is computed by
  an `output_processor` injected into forward when the caller gives none.
* megatron-core 0.16 / 0.17 (no hook): the instance's `output_layer.forward` and
  `compute_language_model_loss` are wrapped. While a patched forward runs with labels, the output
  layer returns a `DeferredLogits` placeholder (shape and dtype of the logits, no storage), and
  `compute_language_model_loss` turns it into the fused loss.
* Multi-token-prediction heads (every version) call `output_layer` and
  `compute_language_model_loss` too, so they go through the same placeholder. MuP's logit scale
  (`logits * mult`) is folded in; the argmax that 0.19 computes for its MTP acceptance metric is
  computed in token chunks under no_grad. Any other use of the placeholder materialises the logits
  through the original output layer (correct, with one warning).

Gradients: the hidden-state gradient is all-reduced over the tensor-parallel group exactly once
(as ColumnParallelLinear's would be), or reduce-scattered under sequence parallelism; for bf16 the
ranks' partial sums are summed in float32 and rounded once (linear_cross_entropy's). The
classifier's gradient goes to `weight.grad` and Megatron's DDP hook adds it to `main_grad`; when
the output layer uses gradient-accumulation fusion and the weight has a `main_grad`, it is added
into `main_grad` in backward instead, by the loss itself (`dc_accumulate_into`; the fast mode's
held-logits path accumulates it there straight from a float32-output product, no dC tensor), and
`grad_added_to_main_grad` set, as Megatron's fused wgrad does. No parameter or module is replaced, so parameter names and checkpoints are unchanged.

Pipeline parallelism: only the stage with `output_layer` (post_process) is changed; on other
stages the call is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C import DisableTorchFunctionSubclass

from .api import linear_cross_entropy
from .planning import check_loss_options

SUPPORTED_MIN = (0, 16)  # inclusive
SUPPORTED_MAX = (0, 20)  # exclusive: 0.16.x .. 0.19.x
_IGNORE = -100
_STATE_ATTR = "_vp_cce_state"
_ARGMAX_CHUNK_ELEMS = 1 << 24  # logits elements per chunk when the MTP metric needs an argmax


# --------------------------------------------------------------------------- checks


def megatron_core_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the installed megatron-core; ImportError when it is missing."""
    try:
        from megatron.core import package_info
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("vocab_parallel_cce.megatron needs megatron-core (pip install megatron-core)") from err
    parts = []
    for piece in str(package_info.__version__).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def _check_version(allow_unsupported: bool) -> tuple[int, int, int]:
    v = megatron_core_version()
    if not SUPPORTED_MIN <= v[:2] < SUPPORTED_MAX and not allow_unsupported:
        lo = ".".join(map(str, SUPPORTED_MIN))
        hi = f"{SUPPORTED_MAX[0]}.{SUPPORTED_MAX[1] - 1}"
        raise RuntimeError(
            f"vocab_parallel_cce.megatron supports megatron-core {lo}.x to {hi}.x; the installed version is "
            f"{'.'.join(map(str, v))}. Pass allow_unsupported_version=True to try it anyway."
        )
    return v


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module-style wrappers (each keeps it in `.module`)."""
    seen = 0
    while not hasattr(model, "compute_language_model_loss") and hasattr(model, "module") and seen < 8:
        model, seen = model.module, seen + 1
    return model


def _check_model(model) -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    missing = [a for a in ("config", "compute_language_model_loss", "_postprocess") if not hasattr(model, a)]
    if not isinstance(model, LanguageModule) or missing:
        what = type(model).__name__
        extra = f" (missing: {', '.join(missing)})" if missing else " (not a megatron.core LanguageModule)"
        raise TypeError(
            f"patch_gpt_model: expected a megatron-core GPTModel (or a subclass / wrapper of one), got {what}{extra}"
        )


@dataclass
class MegatronLossOptions:
    """Loss options of a patched model (see `patch_gpt_model`)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    true_vocab_size: int | None = None
    impl: str = "auto"
    filter_eps: Any = None  # dC tile skipping off (linear_cross_entropy's default)
    grad_in_forward: bool | str = "auto"  # see patch_gpt_model
    class_weights: Any = None  # [vocab] float tensor (F.cross_entropy's weight), moved to the loss's device once
    mtp_heads: bool = False  # the model has multi-token-prediction heads (their rolled masks are not seen)


def _config_softcap(config) -> float | None:
    for name in ("final_logit_softcapping", "output_logit_softcapping", "logit_softcapping"):
        v = getattr(config, name, None)
        if v:
            return float(v)
    return None


def _resolve_options(model, label_smoothing, z_loss, softcap, true_vocab_size, impl, filter_eps,
                     grad_in_forward="auto") -> MegatronLossOptions:
    config = model.config
    cfg_cap = _config_softcap(config)
    if softcap is None:
        softcap = cfg_cap
    elif cfg_cap is not None and float(softcap) != cfg_cap:
        raise ValueError(f"softcap={softcap} contradicts the model config's final-logit softcap ({cfg_cap})")
    check_loss_options(softcap, label_smoothing, z_loss, filter_eps, impl)
    padded = getattr(model, "vocab_size", None)
    if true_vocab_size is not None:
        if not isinstance(true_vocab_size, int) or true_vocab_size <= 0:
            raise ValueError(f"true_vocab_size: expected a positive int, got {true_vocab_size!r}")
        if padded is not None and true_vocab_size > padded:
            raise ValueError(
                f"true_vocab_size={true_vocab_size} is larger than the model's (padded) vocab_size={padded}"
            )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise ValueError(
            "the model config sets defer_embedding_wgrad_compute=True, which the fused loss does not support "
            "(its classifier gradient is computed in backward); turn it off"
        )
    if not (grad_in_forward == "auto" or isinstance(grad_in_forward, bool)):
        raise TypeError(f"grad_in_forward: expected True, False or 'auto', got {grad_in_forward!r}")
    mtp = bool(getattr(config, "mtp_num_layers", None))
    if grad_in_forward is True and mtp:
        raise ValueError(
            "grad_in_forward=True does not support multi-token-prediction heads: their loss mask is zero at "
            "each sequence's last positions, so their per-token upstream gradient is not uniform where the "
            "logits do not fit one chunk (grad_in_forward='auto' takes the fast mode where they do)"
        )
    return MegatronLossOptions(float(label_smoothing), float(z_loss), softcap, true_vocab_size, impl, filter_eps,
                               grad_in_forward, mtp_heads=mtp)


def _check_class_weights(w, model, true_vocab_size):
    """w, checked early (linear_cross_entropy checks it again against the shard layout)."""
    if w is None:
        return None
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 1:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"class_weights: expected a 1-D floating-point tensor (one weight per vocabulary id), got {got}")
    sizes = {s for s in (getattr(model, "vocab_size", None), true_vocab_size) if s is not None}
    if sizes and w.shape[0] not in sizes:
        raise ValueError(f"class_weights: expected {' or '.join(map(str, sorted(sizes)))} weights (the vocabulary), "
                         f"got {w.shape[0]}")
    return w.detach()


# --------------------------------------------------------------------------- gradient into main_grad


class _WgradIntoMainGrad(torch.autograd.Function):
    """Identity on the weight; backward adds its gradient into `weight.main_grad` (fused-wgrad
    style). The loss gets `dc_accumulate_into=weight.main_grad` too, so it has already added the
    classifier's gradient there (the fast mode's held-logits path straight from the product, with
    no dC tensor) and hands this Function no gradient (None); one that does arrive is added."""

    @staticmethod
    def forward(ctx, weight):
        ctx.weight = weight
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.weight
        if grad is not None:
            weight.main_grad.add_(grad)
        if hasattr(weight, "grad_added_to_main_grad"):
            # Megatron DDP: its hook skips (or, with zero_out_wgrad, adds) param.grad; hand it zeros
            # so that hooks run on the main thread and nothing is counted twice.
            weight.grad_added_to_main_grad = True
            return torch.zeros_like(weight)
        return None


# --------------------------------------------------------------------------- the fused head


@dataclass
class _PatchState:
    model: Any
    output_layer: Any
    options: MegatronLossOptions
    orig_layer_forward: Any = None
    orig_model_forward: Any = None
    orig_loss_fn: Any = None
    has_output_processor: bool = False
    defer: int = 0
    loss_mask: Any = None  # the running forward's `loss_mask` argument (used by grad_in_forward)
    warned: set = field(default_factory=set)

    # -- helpers ------------------------------------------------------------
    def logit_scale(self) -> float:
        cfg = self.model.config
        if getattr(cfg, "use_mup", False):
            return float(getattr(cfg, "mup_output_mult", 1.0))
        return 1.0

    def tp_group(self):
        layer = self.output_layer
        group = getattr(layer, "tp_group", None)
        if group is None:
            from megatron.core import parallel_state

            group = parallel_state.get_tensor_model_parallel_group()
        return group

    def fused_loss(self, hidden, weight, labels, scale: float = 1.0):
        """Per-token loss [b, s] from hidden [s(/tp), b, h], this rank's classifier shard and labels [b, s]."""
        layer, opt = self.output_layer, self.options
        if weight is None:
            weight = layer.weight
        if weight is None:
            raise RuntimeError("output layer has no weight and none was passed (shared embeddings)")
        group = self.tp_group()
        world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank(group) if world > 1 else 0
        sequence_parallel = bool(getattr(layer, "sequence_parallel", False)) and world > 1
        if scale != 1.0:
            hidden = hidden * scale
        c, into = weight, None
        fused_wgrad = getattr(layer, "gradient_accumulation_fusion", False)
        if fused_wgrad and hasattr(weight, "main_grad") and weight.requires_grad:
            c = _WgradIntoMainGrad.apply(weight)
            main_grad = weight.main_grad
            if tuple(main_grad.shape) == tuple(weight.shape) and main_grad.is_contiguous():
                into = main_grad  # the loss adds dC there itself (float32: straight from the product)
        bias = getattr(layer, "bias", None)
        if bias is not None and getattr(layer, "skip_bias_add", False):
            bias = None  # Megatron returns it separately and never adds it to the logits
        v_local = weight.shape[0]
        used_vocab = opt.true_vocab_size or v_local * world
        mask_seen = self.loss_mask is not None and self.loss_mask.shape == labels.shape
        # "auto": with the loss mask seen (and no MTP heads, whose rolled masks are not), the fast mode,
        # exact on both of its paths; else linear_cross_entropy's "auto": the fast mode where the
        # logits fit one chunk (held to the backward: any upstream gradient), else memory-first.
        grad_in_forward = opt.grad_in_forward
        if grad_in_forward == "auto" and mask_seen and not opt.mtp_heads:
            grad_in_forward = True
        targets = labels.transpose(0, 1)  # [s, b]
        # Megatron's contract: every label position has a loss, loss_mask decides later. Labels
        # outside the vocabulary (e.g. -100 / -1 padding) get loss 0 and no gradient here, never NaN.
        targets = torch.where((targets >= 0) & (targets < used_vocab), targets, _IGNORE)
        if sequence_parallel:
            s_local = hidden.shape[0]
            if targets.shape[0] != s_local * world:
                raise ValueError(
                    f"sequence parallel: labels cover {targets.shape[0]} positions but the hidden states "
                    f"hold {s_local} per rank × {world} ranks"
                )
            targets = targets[rank * s_local : (rank + 1) * s_local]
        # The fast mode needs one upstream weight on every scored position: positions the loss mask
        # drops keep their loss but take no gradient (the mask multiplies them by 0 anyway).
        mask = None
        if grad_in_forward is True and mask_seen:
            mask = self.loss_mask.to(labels.device).transpose(0, 1)  # [s, b]
            if sequence_parallel:
                mask = mask[rank * s_local : (rank + 1) * s_local]
            mask = mask.contiguous()
        # ColumnParallelLinear all-reduces its input gradient unless told not to; so do we, once.
        reduce_grad_e = not (
            getattr(layer, "disable_grad_reduce", False) or getattr(layer, "explicit_expert_comm", False)
        )
        loss = linear_cross_entropy(
            hidden,
            c,
            targets.contiguous(),
            bias,
            ignore_index=_IGNORE,
            softcap=opt.softcap,
            reduction="none",
            filter_eps=opt.filter_eps,
            label_smoothing=opt.label_smoothing,
            z_loss=opt.z_loss,
            impl=opt.impl,
            group=group if world > 1 else None,
            vocab_start=rank * v_local if world > 1 else None,
            vocab_size=used_vocab,
            reduce_grad_e=reduce_grad_e,
            sequence_parallel=sequence_parallel,
            grad_in_forward=grad_in_forward,
            loss_mask=mask,
            class_weights=self.class_weights(hidden.device),
            dc_accumulate_into=into,
        )
        return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]

    def class_weights(self, device):
        w = self.options.class_weights
        if w is not None and w.device != device:
            w = self.options.class_weights = w.to(device)  # once: later calls find it there
        return w

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(msg, stacklevel=3)

    @contextlib.contextmanager
    def deferring(self, on: bool):
        saved, self.defer = self.defer, (self.defer + 1 if on else 0)
        try:
            yield
        finally:
            self.defer = saved


# --------------------------------------------------------------------------- the placeholder


_METADATA_FUNCS = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.is_floating_point,
    torch.Tensor.__len__,
    torch.Tensor.ndimension,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
}
_METADATA_PROPS = {"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "is_sparse", "grad_fn"}
_MUL_FUNCS = {torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul}


class DeferredLogits(torch.Tensor):
    """Stands for the output layer's logits [s, b, V_local] without computing them.

    `compute_language_model_loss` of a patched model turns it into the fused loss; multiplying by a
    number (MuP) keeps it deferred; max/argmax over the last dimension run in token chunks; any
    other operation materialises the logits through the original output layer.
    """

    @staticmethod
    def __new__(cls, state, hidden, weight, runtime_gather_output, scale=1.0):
        layer = state.output_layer
        w = weight if weight is not None else layer.weight
        group = state.tp_group()
        world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        gather = layer.gather_output if runtime_gather_output is None else runtime_gather_output
        s = hidden.shape[0] * (world if getattr(layer, "sequence_parallel", False) and world > 1 else 1)
        v = w.shape[0] * (world if gather else 1)
        t = torch.Tensor._make_wrapper_subclass(
            cls, (s,) + tuple(hidden.shape[1:-1]) + (v,), dtype=hidden.dtype, device=hidden.device, requires_grad=False
        )
        t._state, t._hidden, t._weight, t._rgo = state, hidden, weight, runtime_gather_output
        t._scale, t._gathered = scale, gather
        return t

    def materialize(self) -> torch.Tensor:
        logits, _ = self._state.orig_layer_forward(self._hidden, weight=self._weight, runtime_gather_output=self._rgo)
        return logits * self._scale if self._scale != 1.0 else logits

    def _chunked_max(self, want_values: bool):
        """Global-shard max / argmax over the last dim, chunked over tokens, no grad."""
        state, layer = self._state, self._state.output_layer
        with torch.no_grad():
            h = self._hidden
            group = state.tp_group()
            world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
            if getattr(layer, "sequence_parallel", False) and world > 1:
                from .distributed import all_gather_along_dim0

                h = all_gather_along_dim0(h, group, "gather hidden states for the MTP argmax")
            w = self._weight if self._weight is not None else layer.weight
            bias = getattr(layer, "bias", None)
            if bias is not None and getattr(layer, "skip_bias_add", False):
                bias = None
            flat = h.reshape(-1, h.shape[-1])
            step = max(1, _ARGMAX_CHUNK_ELEMS // max(1, w.shape[0]))
            vals, idx = [], []
            for i in range(0, flat.shape[0], step):
                z = flat[i : i + step] @ w.t()
                if bias is not None:
                    z = z + bias
                if self._scale != 1.0:
                    z = z * self._scale
                m, a = z.max(dim=-1)
                vals.append(m)
                idx.append(a)
            out_shape = tuple(h.shape[:-1])
            vals = torch.cat(vals).view(out_shape) if vals else flat.new_empty(out_shape)
            idx = torch.cat(idx).view(out_shape) if idx else flat.new_empty(out_shape, dtype=torch.long)
        return (vals, idx) if want_values else idx

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_FUNCS or getattr(func, "__name__", None) == "__get__" and (
            getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA_PROPS
        ):
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in _MUL_FUNCS and len(args) == 2 and not kwargs:
            a, b = args
            d, k = (a, b) if isinstance(a, DeferredLogits) else (b, a)
            if isinstance(d, DeferredLogits) and isinstance(k, (int, float)) and not isinstance(k, bool):
                return DeferredLogits(d._state, d._hidden, d._weight, d._rgo, d._scale * float(k))
        if func in (torch.Tensor.max, torch.max, torch.Tensor.argmax, torch.argmax) and args and isinstance(
            args[0], DeferredLogits
        ):
            d = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            extra = set(kwargs) - {"dim"}
            if dim is not None and dim in (-1, d.dim() - 1) and not extra and len(args) <= 2 and not d._gathered:
                if func in (torch.Tensor.max, torch.max):
                    vals, idx = d._chunked_max(True)
                    return torch.return_types.max((vals, idx))
                return d._chunked_max(False)
        # Anything else: compute the real logits (through the original output layer) and carry on.
        first = next((a for a in args if isinstance(a, DeferredLogits)), None)
        if first is None:
            first = next((v for v in kwargs.values() if isinstance(v, DeferredLogits)), None)
        if first is not None:
            first._state.warn_once(
                "materialize",
                f"vocab_parallel_cce.megatron: `{getattr(func, '__name__', func)}` on the deferred logits of a "
                "patched model materialises them (correct, but without the fused loss's memory savings)",
            )
        from torch.utils._pytree import tree_map

        def mat(x):
            return x.materialize() if isinstance(x, DeferredLogits) else x

        return func(*tree_map(mat, args), **tree_map(mat, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # pragma: no cover - guarded above
        raise RuntimeError(f"vocab_parallel_cce.megatron: {func} reached a DeferredLogits placeholder")

    def __repr__(self):
        return f"DeferredLogits(shape={tuple(self.shape)}, dtype={self.dtype})"


# --------------------------------------------------------------------------- the patch


def _inference_active(model, bound) -> bool:
    ctx = bound.arguments.get("inference_context") or bound.arguments.get("inference_params")
    try:
        from megatron.core.inference.utils import InferenceMode

        if InferenceMode.is_active():
            return True
    except ImportError:
        pass
    return ctx is not None


def patch_gpt_model(
    model,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    true_vocab_size: int | None = None,
    impl: str = "auto",
    filter_eps: Any = None,
    grad_in_forward: bool | str = "auto",
    class_weights: torch.Tensor | None = None,
    allow_unsupported_version: bool = False,
):
    """Make a built megatron-core GPTModel compute its training loss with the fused vocab-parallel loss.

    Args:
        model: a GPTModel (or subclass), possibly wrapped in DDP / Float16Module (`.module`).
        label_smoothing: ε; loss = (1−ε)·nll + ε·(lse − mean_j z_j) with the mean over the whole
            (global) vocabulary — unlike Megatron's own option, which averages over each rank's shard
            and rescales ε by K/(K−1) (at TP = 1, Megatron's α equals ε = α·K/(K−1)).
        z_loss: λ; adds λ·lse² per token.
        softcap: logits z ← cap·tanh(z/cap) in the loss. Defaults to the config's
            `final_logit_softcapping` when it has one; a different value is an error.
        true_vocab_size: the unpadded vocabulary size. When given, the padded classifier rows
            (ids >= true_vocab_size) are left out of the softmax and of label smoothing. Off by
            default, so that the numbers match Megatron's (which includes the padded rows).
        impl, filter_eps: passed to `linear_cross_entropy` (impl "auto": triton on a supported GPU;
            filter_eps None: no dC tile skipping, "auto" the adaptive skipping).
        grad_in_forward: the loss's mode (`linear_cross_entropy`'s). True, the fast mode (6·N·D·V
            FLOPs instead of 8; the shard's logits held once in 16 bits, as Megatron's own layer
            holds them). Where the logits fit one chunk (`Tuning.fast_logits_bytes`, 4 GiB: the
            common case) they are held to the backward and the gradients formed there, so any
            loss mask and any upstream gradient is exact. Otherwise (token chunks, gradients in
            the forward) it needs Megatron's `sum(losses * loss_mask) / n` with a 0/1 loss mask:
            positions where the `loss_mask` passed to the model's forward is 0 keep their
            per-token loss but take no gradient, so every scored position gets the same upstream
            gradient; a loss mask with other values, or zeros that the forward did not receive,
            then gives NaN gradients (checked on the device; Megatron's NaN check stops the step).
            Not with multi-token-prediction heads (a ValueError). False, the memory-first mode:
            any loss mask, logits recomputed in the backward, CCE memory. "auto" (the default,
            backed by a multi-seed training-curve comparison against Megatron's loss): the fast mode in
            each forward that receives `loss_mask` (Megatron's GPT training step passes it), and
            else (no mask seen, or multi-token-prediction heads) `linear_cross_entropy`'s "auto":
            the fast mode where the logits fit one chunk on the Triton backend, else memory-first.
            With gradient-accumulation fusion (`weight.main_grad`) the classifier's gradient is
            added into main_grad by the loss (`dc_accumulate_into`); on the held-logits path by
            one float32-output product, with no bf16 dC tensor.
        class_weights: per-class weights w [vocab] (the padded vocabulary or true_vocab_size
            entries; F.cross_entropy's `weight`): the per-token loss becomes w[label]·nll (with
            label smoothing, F.cross_entropy's weighted form). Megatron's loss function then
            divides by its token count, not by the summed weights. No gradient.
        allow_unsupported_version: skip the megatron-core version check (0.16.x–0.19.x).

    Returns:
        the same `model` object, patched in place. `unpatch_gpt_model(model)` undoes it.
    """
    _check_version(allow_unsupported_version)
    inner = _unwrap(model)
    _check_model(inner)
    if getattr(inner, _STATE_ATTR, None) is not None:
        raise RuntimeError("patch_gpt_model: this model is already patched (unpatch_gpt_model(model) first)")
    options = _resolve_options(inner, label_smoothing, z_loss, softcap, true_vocab_size, impl, filter_eps,
                               grad_in_forward)
    options.class_weights = _check_class_weights(class_weights, inner, true_vocab_size)

    layer = getattr(inner, "output_layer", None) if getattr(inner, "post_process", True) else None
    if layer is None:
        # A pipeline stage without the head: nothing computes a loss here.
        object.__setattr__(inner, _STATE_ATTR, _PatchState(inner, None, options))
        return model
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    if not isinstance(layer, ColumnParallelLinear):
        raise TypeError(
            f"patch_gpt_model: the output layer is a {type(layer).__name__}; only megatron-core's "
            "ColumnParallelLinear output layer is supported"
        )

    state = _PatchState(inner, layer, options)
    state.orig_layer_forward = layer.forward  # bound method of the instance
    state.orig_model_forward = inner.forward
    state.orig_loss_fn = inner.compute_language_model_loss
    sig = inspect.signature(state.orig_model_forward)
    state.has_output_processor = "output_processor" in sig.parameters  # megatron-core >= 0.18

    @functools.wraps(state.orig_layer_forward)
    def output_layer_forward(input_, weight=None, runtime_gather_output=None):
        if state.defer:
            return DeferredLogits(state, input_, weight, runtime_gather_output), None
        return state.orig_layer_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)

    @functools.wraps(state.orig_loss_fn)
    def compute_language_model_loss(labels, logits):
        if isinstance(logits, DeferredLogits):
            return state.fused_loss(logits._hidden, logits._weight, labels, logits._scale)
        return state.orig_loss_fn(labels, logits)

    def make_processor(user_processor):
        def processor(**kw):
            # The main head. MTP heads (called before this) were deferred; here nothing is.
            with state.deferring(False):
                if user_processor is not None:
                    return user_processor(**kw)
                labels = kw.get("labels")
                if labels is None:
                    logits, _ = kw["output_layer"](
                        kw["hidden_states"], weight=kw.get("output_weight"),
                        runtime_gather_output=kw.get("runtime_gather_output"),
                    )
                    scale = kw.get("scale_logits")
                    if scale is not None:
                        logits = scale(logits)
                    return logits.transpose(0, 1).contiguous()
                return state.fused_loss(kw["hidden_states"], kw.get("output_weight"), labels, state.logit_scale())

        return processor

    @functools.wraps(state.orig_model_forward)
    def model_forward(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        if _inference_active(inner, bound):
            return state.orig_model_forward(*args, **kwargs)
        labels = bound.arguments.get("labels")
        state.loss_mask = bound.arguments.get("loss_mask")
        try:
            if state.has_output_processor:
                kwargs = dict(kwargs)
                kwargs["output_processor"] = make_processor(bound.arguments.get("output_processor"))
                # MTP heads may compute a loss even without labels (0.19 derives them from input_ids).
                with state.deferring(True):
                    return state.orig_model_forward(*args, **kwargs)
            with state.deferring(labels is not None):
                return state.orig_model_forward(*args, **kwargs)
        finally:
            state.loss_mask = None

    # Instance attributes: nn.Module.__call__ looks up self.forward; parameters stay untouched.
    layer.forward = output_layer_forward
    inner.forward = model_forward
    inner.compute_language_model_loss = compute_language_model_loss
    object.__setattr__(inner, _STATE_ATTR, state)
    return model


def unpatch_gpt_model(model):
    """Undo `patch_gpt_model` (the model computes logits and Megatron's loss again)."""
    inner = _unwrap(model)
    state = getattr(inner, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("unpatch_gpt_model: this model is not patched")
    if state.output_layer is not None:
        for obj, name in ((state.output_layer, "forward"), (inner, "forward"), (inner, "compute_language_model_loss")):
            obj.__dict__.pop(name, None)
    object.__delattr__(inner, _STATE_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(_unwrap(model), _STATE_ATTR, None) is not None
