"""The fused head of a Megatron GPTModel patched by `megatron.patch_gpt_model`: the per-model
state that computes the fused loss from the hidden states and this rank's classifier shard
(`_PatchState.fused_loss`), the `DeferredLogits` placeholder the output layer returns while a
patched forward runs with labels, and the Function that adds the classifier's gradient into
`weight.main_grad` (gradient-accumulation fusion)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._C import DisableTorchFunctionSubclass

from ..api import linear_cross_entropy
from ..distributed import all_gather_along_dim0

_IGNORE = -100
_ARGMAX_CHUNK_ELEMS = 1 << 24  # logits elements per chunk when the MTP metric needs an argmax


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



# --------------------------------------------------------------------------- gradient into main_grad


class _WgradIntoMainGrad(torch.autograd.Function):
    """Identity on the weight; backward adds its gradient into `weight.main_grad` (fused-wgrad
    style). The loss gets `dc_accumulate_into=weight.main_grad` too, so it has already added the
    classifier's gradient there (the held-logits and memory-first paths straight from the products,
    with no dC tensor) and hands this Function no gradient (None); one that does arrive is added."""

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
