"""Hugging Face Transformers integration: compute causal-LM losses without materialising the logits.

    from vocab_parallel_cce.transformers import patch

    model = AutoModelForCausalLM.from_pretrained(...)
    patch(model)                      # this instance; returns it
    patch("llama")                    # or every LlamaForCausalLM (class forward); returns the class
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss, out.logits is None

After `patch`, a forward call WITH `labels` computes the loss with `linear_cross_entropy` on the
hidden states the model feeds its `lm_head` and on `lm_head.weight` (and `lm_head.bias`), with the
same semantics as Transformers' `ForCausalLMLoss`:

* labels are shifted by one (position t predicts labels[t + 1]); a `shift_labels=` keyword is used
  as is, without shifting, as Transformers does;
* `ignore_index` -100 (or an `ignore_index=` forward keyword);
* `num_items_in_batch=`: the summed loss divided by it; otherwise the mean over non-ignored tokens;
* Gemma 2 / Gemma 3 `config.final_logit_softcapping` is applied inside the fused loss;
* `logits_to_keep` slices the hidden states exactly as the model does.

The returned output is the model's own output class with `loss` set and `logits=None` (a tuple
without logits for `return_dict=False`); the cache, hidden states and attentions are the model's.
Without labels the original forward runs unchanged. In eval mode (`model.training` False) with
labels, the fused loss is used too unless `patch(..., eval_logits=True)`, which then runs the
original forward (logits materialised and returned, loss by Transformers).

How it works: the wrapper runs the model's ORIGINAL forward with `labels=None` while `lm_head` is
temporarily replaced by a stand-in that records its input (the final, `logits_to_keep`-sliced
hidden states) and returns an empty [..., 0] float32 placeholder instead of logits. Everything the
forward does before the head (signature, cache, masks, attention outputs, `return_dict`) is
therefore the installed version's own code. The stand-in bypasses `lm_head`'s hooks (tensor-
parallel, accelerate device hooks), so the wrapper handles those cases itself (see below).

Supported families (model types): llama, mistral, phi3, gemma2, gemma3_text (Gemma 3 text-only
`Gemma3ForCausalLM`), qwen2, qwen3. Any other causal LM goes through the GENERIC path,
`patch(model_or_type, generic=True)`, which requires: a plain `torch.nn.Linear` `lm_head`, called
once per forward; a forward that passes the logits to `self.loss_function` (Transformers'
`ForCausalLMLoss`) and returns a `ModelOutput` with `loss` and `logits` fields; no transformation
of the logits after the head other than `config.final_logit_softcapping`. The last condition is
checked at every call: a model that rescales its logits (Cohere's `logit_scale`, Granite's
`logits_scaling`, ...) raises instead of returning a wrong loss.

Tensor parallelism: when `lm_head.weight` is a DTensor sharded along the vocabulary (placement
`Shard(0)` on one mesh dimension, `Replicate()` on any other, as Transformers' `colwise*` plans for
`lm_head` give) the vocabulary-parallel path is used: the local shard, the group of that mesh
dimension, and this rank's global row offset (uneven shards included). The hidden states entering
the head must be replicated across that group (Transformers' default plans); a DTensor input is
made replicated first. An `lm_head` sharded by FSDP2 on its own (`fully_shard(model.lm_head)`) is
refused (its weight would look vocabulary-sharded); shard it together with the root module.

Supported Transformers versions: SUPPORTED_TRANSFORMERS (>= 4.50, < 6; tested with 5.24). The
approach relies only on `lm_head`, `loss_function`/`ForCausalLMLoss` and `ModelOutput`, which have
this shape across that range; Qwen3 needs >= 4.51.

`transformers` is optional: importing this module does not import it; `patch` does.

Differences from Transformers: a batch whose labels are all ignored gives loss 0 (with a zero
gradient) instead of NaN with the mean reduction.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..api import linear_cross_entropy
from ..distributed import dtensor_vocab_shard, is_dtensor

__all__ = ["patch", "unpatch", "SUPPORTED_MODEL_TYPES", "SUPPORTED_TRANSFORMERS"]

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Model types that are easily confused with a supported one.
_HINTS = {
    "gemma3": "model type 'gemma3' is the multimodal Gemma3ForConditionalGeneration; the supported "
    "family is the text-only 'gemma3_text' (Gemma3ForCausalLM); try generic=True for the multimodal one",
}
SUPPORTED_TRANSFORMERS = (">=4.50", "<6")
_MIN_VERSION = (4, 50)
_MAX_VERSION_EXCLUSIVE = (6, 0)

# linear_cross_entropy arguments the integration sets itself.
_RESERVED_OPTIONS = {
    "e", "c", "targets", "bias", "softcap", "reduction", "shift", "return_lse", "group",
    "vocab_start", "vocab_size", "sequence_parallel", "vocab_parallel_options",
    "return_z_loss", "return_token_accuracy", "return_predicted_tokens",  # the output is the loss
}  # fmt: skip
_ORIGINAL_ATTR = "__vpcce_original_forward__"
_CONFIG_ATTR = "__vpcce_patch_config__"


@dataclass
class _PatchConfig:
    loss_options: dict[str, Any] = field(default_factory=dict)
    eval_logits: bool = False
    generic: bool = False


# --------------------------------------------------------------------------------------------
# transformers import and version check


def _parse_version(v: str) -> tuple[int, int]:
    parts = []
    for piece in v.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "vocab_parallel_cce.transformers needs the `transformers` package "
            "(pip install 'vocab_parallel_cce[transformers]')"
        ) from err
    version = getattr(transformers, "__version__", "0")
    if not _MIN_VERSION <= _parse_version(version) < _MAX_VERSION_EXCLUSIVE:
        raise RuntimeError(
            f"vocab_parallel_cce.transformers supports transformers {','.join(SUPPORTED_TRANSFORMERS)}; "
            f"found transformers {version}"
        )
    return transformers


def _causal_lm_loss_function():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


# --------------------------------------------------------------------------------------------
# resolving what to patch


def _class_for_model_type(transformers, model_type: str, generic: bool):
    if model_type in SUPPORTED_MODEL_TYPES:
        name = SUPPORTED_MODEL_TYPES[model_type]
    elif not generic:
        hint = _HINTS.get(model_type, "pass generic=True to use the generic lm_head path")
        raise ValueError(
            f"patch: unsupported model type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)} ({hint})"
        )
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if name is None:
            raise ValueError(f"patch: model type {model_type!r} has no causal-LM class in transformers")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(
            f"patch: model type {model_type!r} needs {name}, which transformers {transformers.__version__} "
            "does not provide (a newer transformers may)"
        )
    return cls


def _check_instance(transformers, model, generic: bool) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: expected a model-type string or a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        cls = _class_for_model_type(transformers, model_type, False)
        if isinstance(model, cls):
            return
        if not generic:
            raise ValueError(
                f"patch: a {model_type!r} model is supported as {cls.__name__}, got {type(model).__name__} "
                "(pass generic=True to try the generic lm_head path)"
            )
    elif not generic:
        hint = _HINTS.get(model_type, "pass generic=True to use the generic lm_head path")
        raise ValueError(
            f"patch: unsupported model type {model_type!r} ({type(model).__name__}); "
            f"supported: {sorted(SUPPORTED_MODEL_TYPES)} ({hint})"
        )
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise ValueError(
            f"patch: the generic path needs a torch.nn.Linear `lm_head`; {type(model).__name__} has "
            f"{type(getattr(model, 'lm_head', None)).__name__}"
        )


def _check_loss_options(options: dict[str, Any]) -> None:
    known = set(inspect.signature(linear_cross_entropy).parameters)
    for key in options:
        if key in _RESERVED_OPTIONS:
            raise ValueError(f"patch: loss option {key!r} is set by the integration and cannot be given")
        if key not in known:
            raise TypeError(f"patch: unknown loss option {key!r} (see linear_cross_entropy)")


# --------------------------------------------------------------------------------------------
# the classifier: plain tensor, or DTensor sharded along the vocabulary


def _is_fsdp_module(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _classifier(lm_head) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(weight, bias, vocabulary-parallel kwargs for linear_cross_entropy)."""
    w, b = lm_head.weight, lm_head.bias
    if is_dtensor(w) and _is_fsdp_module(lm_head) and any(p.is_shard() for p in w.placements):
        raise NotImplementedError(
            "patch: lm_head is sharded by FSDP2 on its own; its sharded weight cannot be told apart from a "
            "tensor-parallel vocabulary shard. Shard lm_head together with the root module instead."
        )
    w_local, b_local, group, start = dtensor_vocab_shard(w, b, "patch: lm_head.weight")
    return w_local, b_local, ({} if group is None else {"group": group, "vocab_start": start})


def _replicated_local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


# --------------------------------------------------------------------------------------------
# the stand-in head and the wrapped forward


class _HeadCapture(torch.nn.Module):
    """Takes lm_head's place for one forward: records the hidden states, returns a placeholder."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: list[torch.Tensor] = []
        self.placeholder: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden.append(hidden_states)
        # float32 so that a `.float()` in the forward keeps the same object.
        self.placeholder = torch.empty(
            tuple(hidden_states.shape[:-1]) + (0,), dtype=torch.float32, device=hidden_states.device
        )
        return self.placeholder


def _labels_position(fn: Callable) -> int | None:
    """Index of `labels` among the positional arguments after `self`, or None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if names and names[0] == "self":
        names = names[1:]
    return names.index("labels") if "labels" in names else None


def _wants_return_dict(model, kwargs: dict) -> bool:
    rd = kwargs.get("return_dict")
    if rd is not None:
        return bool(rd)
    config = getattr(model, "config", None)
    for attr in ("return_dict", "use_return_dict"):
        value = getattr(config, attr, None)
        if value is not None:
            return bool(value)
    return True


def _softcap(model) -> float | None:
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def _fused_loss(model, hidden, labels, kwargs, options) -> torch.Tensor:
    lm_head = model.lm_head
    weight, bias, vp_kwargs = _classifier(lm_head)
    if weight.device.type == "meta":
        raise RuntimeError("patch: lm_head.weight is on the meta device (offloaded?); the fused loss needs it")
    e = _replicated_local(hidden)
    if e.device != weight.device:
        e = e.to(weight.device)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is not None:
        targets, shift = shift_labels, 0
    else:
        targets, shift = labels, 1
    targets = _replicated_local(targets).to(e.device)
    ignore_index = kwargs.get("ignore_index", options.get("ignore_index", -100))
    num_items = kwargs.get("num_items_in_batch")
    opts = {k: v for k, v in options.items() if k != "ignore_index"}
    loss = linear_cross_entropy(
        e,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        softcap=_softcap(model),
        reduction="mean" if num_items is None else "sum",
        shift=shift,
        **vp_kwargs,
        **opts,
    )
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss


def _without_logits(out, loss):
    if not dataclasses.is_dataclass(out) or not {"loss", "logits"} <= {f.name for f in dataclasses.fields(out)}:
        raise RuntimeError(
            f"patch: the forward returned {type(out).__name__}, not a ModelOutput with `loss` and `logits`"
        )
    values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.init}
    values.update(loss=loss, logits=None)
    return type(out)(**values)


def _make_forward(call_original: Callable, labels_pos: int | None, config: _PatchConfig) -> Callable:
    """The patched forward(self, *args, **kwargs); call_original(self, args, kwargs) runs the old one."""
    causal_lm_loss = _causal_lm_loss_function()

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and labels_pos is not None and len(args) > labels_pos:
            labels = args[labels_pos]
        if labels is None or (config.eval_logits and not self.training):
            return call_original(self, args, kwargs)

        lm_head = getattr(self, "lm_head", None)
        if not isinstance(lm_head, torch.nn.Linear):
            raise TypeError(
                f"patch: {type(self).__name__}.lm_head is {type(lm_head).__name__}, not a torch.nn.Linear "
                "(a PEFT/quantised head is not supported by the fused loss)"
            )
        if self.loss_function is not causal_lm_loss:
            raise RuntimeError(
                f"patch: {type(self).__name__}.loss_function is {self.loss_function!r}, not Transformers' "
                "ForCausalLMLoss; the fused loss would replace it. Unpatch the model to use a custom loss."
            )
        call_kwargs = dict(kwargs, return_dict=True)
        if "labels" in call_kwargs:
            call_kwargs["labels"] = None
        elif labels_pos is not None and len(args) > labels_pos:
            args = args[:labels_pos] + (None,) + args[labels_pos + 1 :]
        return_dict = _wants_return_dict(self, kwargs)

        capture = _HeadCapture()
        self._modules["lm_head"] = capture
        try:
            out = call_original(self, args, call_kwargs)
        finally:
            self._modules["lm_head"] = lm_head

        if len(capture.hidden) != 1:
            raise RuntimeError(
                f"patch: {type(self).__name__}'s forward called lm_head {len(capture.hidden)} times; "
                "the fused loss needs exactly one call"
            )
        logits = getattr(out, "logits", None)
        if _softcap(self) is None:
            transformed = logits is not capture.placeholder
        else:
            transformed = not (torch.is_tensor(logits) and logits.shape == capture.placeholder.shape)
        if transformed:
            raise RuntimeError(
                f"patch: {type(self).__name__}'s forward transforms the logits after lm_head (scaling?); "
                "the fused loss cannot reproduce that. Unpatch this model."
            )
        loss = _fused_loss(self, capture.hidden[0], labels, kwargs, config.loss_options)
        out = _without_logits(out, loss)
        return out if return_dict else out.to_tuple()

    return forward


# --------------------------------------------------------------------------------------------
# public API


def patch(
    model_or_model_type: Any,
    *,
    eval_logits: bool = False,
    generic: bool = False,
    **loss_options: Any,
):
    """Make a causal LM compute its loss with `linear_cross_entropy` (see the module docstring).

    Args:
        model_or_model_type: a model instance (only it is patched; it is returned) or a model-type
            string such as "llama" (the class's forward is patched for every instance; the class is
            returned).
        eval_logits: in eval mode, run the original forward (logits and Transformers' loss).
        generic: allow a model type outside SUPPORTED_MODEL_TYPES through the generic lm_head path.
        **loss_options: passed to `linear_cross_entropy` (impl, filter_eps, label_smoothing, z_loss,
            class_weights, ignore_index, reduce_grad_e, ...); the loss shape options are set by the
            integration.

    Patching again replaces the options; `unpatch` restores the original forward.
    """
    transformers = _import_transformers()
    _check_loss_options(loss_options)
    config = _PatchConfig(dict(loss_options), bool(eval_logits), bool(generic))

    if isinstance(model_or_model_type, str):
        cls = _class_for_model_type(transformers, model_or_model_type, generic)
        own = cls.__dict__.get("forward")
        if own is not None and hasattr(own, _ORIGINAL_ATTR):  # patched before: re-patch with new options
            original, inherited = getattr(own, _ORIGINAL_ATTR), own.__vpcce_inherited__
        else:
            original, inherited = cls.forward, own is None

        def call_original(self, args, kwargs):
            return original(self, *args, **kwargs)

        new = _make_forward(call_original, _labels_position(original), config)
        functools.update_wrapper(new, original)
        setattr(new, _ORIGINAL_ATTR, original)
        setattr(new, _CONFIG_ATTR, config)
        new.__vpcce_inherited__ = inherited
        cls.forward = new
        return cls

    model = model_or_model_type
    _check_instance(transformers, model, generic)
    own = getattr(model.__dict__.get("forward"), "__func__", None)
    if own is not None and hasattr(own, _ORIGINAL_ATTR):  # patched before: re-patch with new options
        original, had_instance_forward = getattr(own, _ORIGINAL_ATTR), own.__vpcce_had_instance_forward__
    else:
        had_instance_forward = "forward" in model.__dict__
        original = model.forward  # bound method (class forward, or a wrapper someone installed)

    def call_original_instance(self, args, kwargs):
        return original(*args, **kwargs)

    new = _make_forward(call_original_instance, _labels_position(original), config)
    functools.update_wrapper(new, getattr(original, "__func__", original))
    setattr(new, _ORIGINAL_ATTR, original)
    setattr(new, _CONFIG_ATTR, config)
    new.__vpcce_had_instance_forward__ = had_instance_forward
    model.forward = types.MethodType(new, model)
    return model


def unpatch(model_or_model_type: Any) -> None:
    """Undo `patch` for a model instance or a model-type string (no-op when not patched)."""
    if isinstance(model_or_model_type, str):
        transformers = _import_transformers()
        cls = _class_for_model_type(transformers, model_or_model_type, True)
        fn = cls.__dict__.get("forward")
        original = getattr(fn, _ORIGINAL_ATTR, None)
        if original is None:
            return
        if getattr(fn, "__vpcce_inherited__", False):
            delattr(cls, "forward")
        else:
            cls.forward = original
        return
    model = model_or_model_type
    current = model.__dict__.get("forward")
    func = getattr(current, "__func__", None)
    original = getattr(func, _ORIGINAL_ATTR, None)
    if original is None:
        return
    if getattr(func, "__vpcce_had_instance_forward__", False):
        model.forward = original
    else:
        del model.__dict__["forward"]
