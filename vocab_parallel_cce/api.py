"""The public API: `linear_cross_entropy` and the `LinearCrossEntropy` module, their options
(`VocabParallelOptions`, `LinearCrossEntropyImpl`) and their richer output (`CrossEntropyOutput`).

A call is planned (planning.py: arguments checked, the shard layout, the backend and the path
decided into a `Plan`), then run (run.py: the path's autograd Function, paths/, and the outputs
asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import distributed as vp
from .distributed import clear_layout_cache  # noqa: F401  (documented as vocab_parallel_cce.api.clear_layout_cache)
from .planning import LinearCrossEntropyImpl, default_group, plan_cross_entropy
from .run import CrossEntropyOutput, run_cross_entropy
from .tuning import Tuning

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "VocabParallelOptions", "CrossEntropyOutput",
           "LinearCrossEntropyImpl"]

Reduction = Literal["mean", "sum", "none"]


@dataclass
class VocabParallelOptions:
    """Apple CCE's vocabulary-parallel options: this rank holds classifier rows [start, stop).

    `group=None` is the default process group (torch.distributed's WORLD), as in Apple CCE's
    collectives; without an initialised process group, one rank holding [0, V).
    """

    start: int
    stop: int
    group: Any = None
    reduce_e_grad: bool = True

    @classmethod
    def from_vocab(cls, vocab_size: int, group: Any = None, reduce_e_grad: bool = True) -> "VocabParallelOptions":
        """This rank's part of `vocab_size` rows split over `group` (None: the default group) in
        contiguous ranges by rank, the first `vocab_size % world` ranks holding one row more."""
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size: expected an int > 0, got {vocab_size!r}")
        world = vp.group_size(default_group(group))
        rank = vp.group_rank(default_group(group)) if world > 1 else 0
        base, extra = divmod(vocab_size, world)
        start = rank * base + min(rank, extra)
        return cls(start, start + base + (rank < extra), group, reduce_e_grad)


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: Reduction = "mean",
    shift: int | bool = 0,
    return_lse: bool = False,
    filter_eps: float | str | None = None,
    accum_e_fp32: bool = False,
    accum_c_fp32: bool = False,
    filter_e_grad: bool = True,
    filter_c_grad: bool = True,
    impl: str | LinearCrossEntropyImpl = "auto",
    vocab_parallel_options: VocabParallelOptions | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weights: torch.Tensor | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_grad_e: bool = True,
    sequence_parallel: bool = False,
    grad_in_forward: bool | str = "auto",
    loss_mask: torch.Tensor | None = None,
    tuning: Tuning | None = None,
    dc_accumulate_into: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of the logits `e @ c.T (+ bias)` without materialising them.

    The positional arguments are Apple CCE's, in its order (accum_e_fp32, accum_c_fp32 and
    filter_e_grad are accepted and change nothing: dE and dC always accumulate in float32 and dE
    is never filtered; filter_c_grad=False turns dC's tile skipping off).

    Args:
        e: hidden states [..., D] (float32/float16/bfloat16; float64 with impl="torch").
        c: classifier [V, D]; under vocabulary parallelism this rank's shard [V_local, D], or a
            DTensor sharded along the vocabulary (Shard(0) on one mesh dimension), from which the
            group and this rank's shard offset are read (then give no group/vocab_start/
            vocab_parallel_options).
        targets: int32/int64 token ids, shape e.shape[:-1]; `ignore_index` marks tokens to skip.
        bias: optional [V] (or [V_local]) added to the logits.
        ignore_index: target value whose token contributes no loss and no gradient.
        softcap: if set, logits z ← softcap·tanh(z / softcap).
        reduction: "mean" over non-ignored tokens (0 when all are ignored), "sum", or "none"
            (per-token loss shaped like `targets[..., shift:]`, 0 at ignored tokens).
        shift: k (or True for 1): e[..., :-k, :] predicts targets[..., k:]; e is not copied.
        return_lse: also return the per-token log-sum-exp (same shape and dtype as the "none" loss).
        filter_eps: the triton backward may skip, in the product for c's gradient only, 128×128
            logit tiles whose softmax is below it everywhere. None (the default): never (every
            tile is computed). "auto": 2**-12 for bf16/fp16 inputs, applied only while the
            kept-tile fraction measured in an earlier call with the same classifier is below 40%
            (Tuning.skip_keep_threshold; it pays on trained-like logits, not on dense ones; the call
            at which skipping starts depends on when the measurement reaches the host); a number:
            always. Off by default because the training-curve benchmark showed it slows early
            training (fused − native loss +0.04–0.05 nats, 20-step mean, around steps 10–30 in
            each of 3 seeds, while the softmax is still flat: many tiles each below eps carry most
            of the mass); never with float32 inputs under "auto", label smoothing or
            impl="triton_exact".
        label_smoothing: ε: loss = (1−ε)·nll + ε·(lse − mean_j z_j), mean over the (global) vocabulary.
        z_loss: λ: adds λ·lse² per token.
        class_weights: F.cross_entropy's `weight`: a [vocab_size] (or padded [V_total]) float
            tensor of the GLOBAL vocabulary, the same on every rank (no gradient). Token i's
            cross-entropy is w[t_i]·nll_i (with label smoothing (1−ε)·w[t_i]·nll_i +
            (ε/V)·Σ_j w_j·(lse_i − z_ij)); "mean" divides it by the summed weights of the
            non-ignored targets (0 → loss 0). The z-loss is not weighted and "mean" divides it by
            the non-ignored count (Liger-Kernel's convention). Both modes, every option (with label
            smoothing the statistics carry the weighted logit sum Σ_j w_j z_j; the fast mode folds
            "mean"'s two divisors into its gradients).
        return_z_loss, return_token_accuracy, return_predicted_tokens: return a
            `CrossEntropyOutput` with, besides the loss, its z-loss part (reduced as the loss,
            "mean" over the non-ignored count; differentiable), the accuracy of the argmax over the
            global vocabulary (float32: the mean over non-ignored tokens for "mean"/"sum", per
            token 0/1 for "none"; 0 where ignored), and the argmax itself (int64 per token, ties
            to the smallest id, −1 where ignored), computed in the forward's pass and combined
            across ranks in its one collective (per token chunk in the fast mode); no host sync.
            The argmax needs vocab_size <= 2**24. Both modes. The fast mode takes the argmax of the
            logits it holds (bf16 for bf16 inputs, as the unfused layer's, where near-ties may
            round to ties), and its z-loss output is a value: its gradient is already inside the
            loss's, so a gradient through the z-loss output itself (e.g. of loss + z_loss) gives
            NaN gradients, never silently wrong ones; differentiate it in the memory-first mode.
        impl: "auto" (triton on a supported CUDA GPU, else torch), "triton", "triton_exact"
            (no gradient filtering; float32 inputs use full-precision instead of TF32 dot products),
            or "torch" (exact, chunked, any device). Apple CCE's "cce", "cce_exact", "torch_compile"
            are aliases. A triton value where Triton cannot run (a CPU tensor without
            TRITON_INTERPRET=1, a GPU older than Ampere, no triton package) falls back to "torch"
            with a UserWarning.
        group: torch.distributed group over which `c` is sharded along the vocabulary.
        vocab_start: first global id of this rank's shard (default rank × V_local).
        vocab_size: true vocabulary size; rows with global id >= vocab_size (padding) are left out
            of the softmax and of label smoothing's mean. Default: every row takes part.
        reduce_grad_e: sum e's gradient over `group` (16-bit inputs: the partial sums in float32,
            rounded once after the sum). False: leave each rank's partial sum, in e's dtype.
        sequence_parallel: e and targets hold this rank's slice of the tokens along dim 0; they are
            all-gathered in forward (e's gradient reduce-scattered in backward, in float32 for
            16-bit inputs) and every rank returns the loss of ALL tokens (shift and "none" shapes
            refer to the gathered tensors).
        vocab_parallel_options: Apple CCE's VocabParallelOptions (start, stop, group, reduce_e_grad);
            its group None is the default process group, as in Apple CCE.
        grad_in_forward: the mode. True (the fast mode): the gradients from materialised logits
            (6·N·D·V FLOPs instead of 8, no recompute; filter_eps is not used; the logits of all
            tokens in the input dtype for bf16, float32 for other dtypes, as the unfused layer holds
            them). Two paths (DESIGN.md): where all tokens' logits fit one chunk of
            Tuning.fast_logits_bytes (4 GiB), the held-logits path keeps them to the backward and
            forms the gradients there, with the upstream gradient known: ANY upstream gradient is
            exact (per token for "none"; the z-loss output's own too), dE and dC rounded once.
            Beyond that, token chunks with the gradients computed during the forward, for an
            upstream gradient that is the same for every non-ignored token: "mean"/"sum", or "none"
            followed by such a reduction (checked on the device: otherwise the gradients are NaN;
            dC accumulates over the chunks in float32). Needs return_lse=False; the backward may
            run only once (no retain_graph) and has no double backward (create_graph=True raises;
            impl="torch" with grad_in_forward=False differentiates twice).
            False (the memory-first mode): statistics in the forward, logits recomputed tile by
            tile in the backward; the backward's memory stays within ~10% of the gradients.
            "auto" (the default): the fast mode where it is exact and cheap to be in — the triton backend, no
            return_lse, not while torch.compile traces (where the memory-first mode's custom ops
            avoid a graph break); "mean"/"sum" always, "none" and return_z_loss where the logits
            fit one chunk (the held-logits path); with any of the other options (class weights,
            label smoothing, z-loss, the accuracy / predicted-token outputs) — else the
            memory-first mode. The default since a multi-seed training-curve comparison against
            the unfused loss showed the fast mode's bf16 logits harmless (benchmarks/RESULTS.md);
            pass False for CCE's memory. Without autograd (no input requires grad) the
            memory-first forward runs in every case.
        loss_mask: with reduction="none", the 0/1 mask that will multiply the per-token loss
            (Megatron's `sum(loss · loss_mask) / n`), shaped like targets (sequence parallel: this
            rank's slice). A promise that positions where it is 0 get upstream gradient 0: the
            fast mode then keeps their loss values but computes no gradient for them, so on its
            token-chunked path the upstream gradient stays uniform over the rest (a non-zero
            upstream gradient there gives NaN gradients, never silently wrong ones, on both paths).
            The memory-first mode needs no promise.
        tuning: performance knobs (block shapes, chunk sizes, TMA, skip-policy thresholds; see
            `Tuning`); None reads them from the VPCCE_* environment variables (`Tuning.from_env`).
        dc_accumulate_into: None, or a contiguous floating-point tensor of c's shape (Megatron's
            float32 `weight.main_grad`; a float32 master gradient under autocast) into which c's
            gradient is ADDED in the backward; c then gets no gradient (c.grad stays None), and
            rows past the vocabulary (padding) get nothing. The memory-first mode adds dC = Gᵀ·E
            chunk by chunk of vocabulary rows as its backward computes them (on the Triton backend
            one float32-output product per chunk into a float32 target), and the fast mode's
            held-logits path with a float32 target (float64 for float64 inputs) accumulates it by
            one float32-output product: no dC tensor is formed and nothing is rounded to c's dtype
            before the add. The token-chunked path forms dC and adds it.

    Returns:
        The loss (a scalar, or per token for "none"), float32 (float64 for float64 inputs); with
        return_lse, (loss, lse); with any return_z_loss / return_token_accuracy /
        return_predicted_tokens, a CrossEntropyOutput (lse in it when return_lse).
        A target outside [0, vocab_size) that is not ignore_index gives a NaN loss for its token.
    """
    plan, call = plan_cross_entropy(
        e, c, targets, bias, ignore_index=ignore_index, softcap=softcap, reduction=reduction, shift=shift,
        return_lse=return_lse, filter_eps=filter_eps, filter_c_grad=filter_c_grad, impl=impl,
        label_smoothing=label_smoothing, z_loss=z_loss, class_weights=class_weights, return_z_loss=return_z_loss,
        return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens, group=group,
        vocab_start=vocab_start, vocab_size=vocab_size, reduce_grad_e=reduce_grad_e,
        sequence_parallel=sequence_parallel, vocab_parallel_options=vocab_parallel_options,
        grad_in_forward=grad_in_forward, loss_mask=loss_mask, tuning=tuning, dc_accumulate_into=dc_accumulate_into,
    )
    return run_cross_entropy(plan, call)


# LinearCrossEntropy's positional parameters: Apple CCE's module, in its order.
_MODULE_POSITIONAL = ("ignore_index", "softcap", "reduction", "shift", "filter_eps", "accum_e_fp32", "accum_c_fp32",
                      "filter_e_grad", "filter_c_grad", "impl", "return_lse")


class LinearCrossEntropy(torch.nn.Module):
    """Module form of `linear_cross_entropy`; options are fixed at construction (`self.options`).

    LinearCrossEntropy(ignore_index, softcap, reduction, shift, filter_eps, accum_e_fp32,
    accum_c_fp32, filter_e_grad, filter_c_grad, impl, return_lse, **keyword options): the
    positional order is Apple CCE's module's; any of linear_cross_entropy's keywords may follow.
    forward(e [..., D], c [V, D], targets [...], bias=None) → loss (see linear_cross_entropy).
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__()
        if len(args) > len(_MODULE_POSITIONAL):
            raise TypeError(f"LinearCrossEntropy: at most {len(_MODULE_POSITIONAL)} positional options "
                            f"({', '.join(_MODULE_POSITIONAL)}), got {len(args)}")
        for name, value in zip(_MODULE_POSITIONAL, args):
            if name in options:
                raise TypeError(f"LinearCrossEntropy: {name} given both positionally and by keyword")
            options[name] = value
        self.options = options

    def forward(self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None):
        return linear_cross_entropy(e, c, targets, bias, **self.options)
