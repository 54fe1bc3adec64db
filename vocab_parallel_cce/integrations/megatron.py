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
into `main_grad` in backward instead, by the loss itself (`dc_accumulate_into`; the held-logits
and memory-first paths accumulate it there straight from float32-output products, no dC tensor), and
`grad_added_to_main_grad` set, as Megatron's fused wgrad does. No parameter or module is replaced, so parameter names and checkpoints are unchanged.

Pipeline parallelism: only the stage with `output_layer` (post_process) is changed; on other
stages the call is a no-op.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from ..planning import check_loss_options
from .megatron_head import DeferredLogits, MegatronLossOptions, _PatchState

SUPPORTED_MIN = (0, 16)  # inclusive
SUPPORTED_MAX = (0, 20)  # exclusive: 0.16.x .. 0.19.x
_STATE_ATTR = "_vp_cce_state"


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
            added into main_grad by the loss (`dc_accumulate_into`); on the held-logits and
            memory-first paths by float32-output products, with no bf16 dC tensor.
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

    _install(_PatchState(inner, layer, options), inner, layer)
    return model


def _install(state: _PatchState, inner, layer) -> None:
    """Wraps the instance's output layer, forward and compute_language_model_loss (instance
    attributes: nn.Module.__call__ looks up self.forward; parameters stay untouched) so that a
    forward with labels computes the fused loss (module docstring), and records `state` on it."""
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

    layer.forward = output_layer_forward
    inner.forward = model_forward
    inner.compute_language_model_loss = compute_language_model_loss
    object.__setattr__(inner, _STATE_ATTR, state)


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
