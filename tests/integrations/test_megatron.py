"""patch_gpt_model against megatron-core's native output layer + vocab_parallel_cross_entropy (CPU, gloo).

Each test forks 1-2 ranks (tests/support/megatron_cpu.py); megatron-core is imported once per pytest
process, so a test costs a second or two after the first.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from support.megatron_cpu import (  # noqa: E402
    HIDDEN,
    SEQ,
    VOCAB,
    batch,
    build_gpt,
    cpu_megatron,
    init_parallel,
    mcore_version,
    padded_vocab,
    spawn,
)
from vocab_parallel_cce.integrations import megatron as vm  # noqa: E402

MCORE = mcore_version()
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

HAS_MUP = "use_mup" in getattr(TransformerConfig, "__dataclass_fields__", {})
RTOL, ATOL = 1e-4, 1e-5


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


class _Probe:
    """Counts fused-loss calls and forbids materialising deferred logits (in the forked rank)."""

    def __init__(self):
        self.calls = 0
        orig = vm._PatchState.fused_loss

        def counting(state, *a, **k):
            self.calls += 1
            return orig(state, *a, **k)

        def refuse(_self):
            raise AssertionError("deferred logits were materialised")

        vm._PatchState.fused_loss = counting
        vm.DeferredLogits.materialize = refuse


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- training equivalence


def _train_compare(rank, world, sp, combos, steps, extra, patch_opts=None):
    probe = _Probe()
    gif = (patch_opts or {}).get("grad_in_forward", False)
    with cpu_megatron():
        init_parallel(world)
        for tied, mtp in combos:
            ref = build_gpt(world, sequence_parallel=sp, tied=tied, mtp_layers=mtp, **extra)
            new = build_gpt(world, sequence_parallel=sp, tied=tied, mtp_layers=mtp, **extra)
            vm.patch_gpt_model(new, **(patch_opts or {}))
            opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, new)]
            tag = f"tp={world} sp={sp} tied={tied} mtp={mtp} {extra}"
            before = probe.calls
            for step in range(steps):
                ids, pos, am, labels, lm = batch(seed=step)
                labels[0, -3:] = -100  # masked positions may hold any label (Megatron: loss_mask decides)
                if gif:  # positions masked by loss_mask are scored as ignored: compare the masked loss
                    assert (lm[0, -5:-3] == 0).all() and (labels[0, -5:-3] != -100).all()
                losses, grads = [], []
                for m, opt in zip((ref, new), opts):
                    opt.zero_grad(set_to_none=True)
                    per_token = m(ids, pos, am, labels=labels, loss_mask=lm)
                    assert per_token.shape == labels.shape and per_token.dtype == torch.float32
                    loss = (per_token * lm).sum() / lm.sum()
                    loss.backward()
                    losses.append((per_token * lm).detach())
                    grads.append(_grads(m))
                    opt.step()
                _close(losses[1], losses[0], f"{tag} step {step} per-token loss")
                assert grads[0].keys() == grads[1].keys(), f"{tag}: gradient sets differ"
                for name in grads[0]:
                    _close(grads[1][name], grads[0][name], f"{tag} step {step} grad of {name}")
            heads = 1 + mtp
            assert probe.calls - before == steps * heads, f"{tag}: fused loss ran {probe.calls - before} times"
    return True


@pytest.mark.parametrize(
    "tp,sp",
    [pytest.param(1, False, id="tp1"), pytest.param(2, False, id="tp2"), pytest.param(2, True, id="tp2-sp")],
)
def test_training_matches_native(tp, sp):
    combos = [(False, 0), (True, 0), (False, 1), (True, 1)]
    spawn(_train_compare, tp, sp, combos, 3, {})


@pytest.mark.parametrize("tp,sp", [pytest.param(1, False, id="tp1"), pytest.param(2, True, id="tp2-sp")])
def test_training_matches_native_grad_in_forward(tp, sp):
    spawn(_train_compare, tp, sp, [(False, 0), (True, 0)], 3, {}, {"grad_in_forward": True})


def _gif_masks(rank, world):
    """grad_in_forward=True with loss masks the forward does not see, or fractional ones: exact on
    the held-logits path (the logits fit one chunk: any upstream gradient), NaN on the token-chunked
    path (forced by VPCCE_FAST_CHUNK_TOKENS=5), which needs one upstream weight on every scored position."""
    import os

    with cpu_megatron():
        init_parallel(world)
        m = build_gpt(world, mtp_layers=1)
        with pytest.raises(ValueError, match="grad_in_forward=True does not support multi-token"):
            vm.patch_gpt_model(m, grad_in_forward=True)
        ref = build_gpt(world)
        m = vm.patch_gpt_model(build_gpt(world), grad_in_forward=True)
        ids, pos, am, labels, lm = batch(seed=1)  # lm has zeros on positions whose labels are valid
        half = lm.clone()
        half[1, :4] = 0.5  # a fractional mask: not one weight on every scored position, even when seen
        for chunked in (False, True):
            if chunked:
                os.environ["VPCCE_FAST_CHUNK_TOKENS"] = "5"  # read by Tuning.from_env: chunks of 5 tokens
            try:
                for mask, seen in ((lm, False), (half, True)):
                    grads = []
                    for model in (ref, m):
                        model.zero_grad(set_to_none=True)
                        kw = {"loss_mask": mask} if seen else {}
                        per_token = model(ids, pos, am, labels=labels, **kw)
                        ((per_token * mask).sum() / mask.sum()).backward()
                        grads.append(_grads(model))
                    if chunked:
                        assert torch.isnan(grads[1]["output_layer.weight"]).all(), \
                            "token chunks: a non-uniform upstream gradient must give NaN"
                    else:
                        for name in grads[0]:
                            _close(grads[1][name], grads[0][name], f"held logits, mask seen={seen}: {name}")
            finally:
                os.environ.pop("VPCCE_FAST_CHUNK_TOKENS", None)
    return True


def test_grad_in_forward_rejects_mtp_and_takes_any_loss_mask_where_it_holds_the_logits():
    spawn(_gif_masks, 1)


@pytest.mark.skipif(not HAS_MUP, reason="this megatron-core has no MuP logit scaling")
def test_training_matches_native_mup():
    spawn(_train_compare, 2, True, [(False, 1)], 2, {"use_mup": True, "mup_output_mult": 0.5})


# --------------------------------------------------------------------------- logits path, checkpoints


def _logits_and_ckpt(rank, world, sp):
    with cpu_megatron():
        init_parallel(world)
        for tied in (False, True):
            ref = build_gpt(world, sequence_parallel=sp, tied=tied)
            new = build_gpt(world, sequence_parallel=sp, tied=tied)
            names_before = [n for n, _ in new.named_parameters()]
            keys_before = list(new.state_dict().keys())
            vm.patch_gpt_model(new)
            assert vm.is_patched(new)
            assert [n for n, _ in new.named_parameters()] == names_before
            assert list(new.state_dict().keys()) == keys_before
            ids, pos, am, labels, _ = batch()
            for m in (ref, new):
                m.eval()
            with torch.no_grad():
                for gather in (None, True):
                    a = ref(ids, pos, am, runtime_gather_output=gather)
                    b = new(ids, pos, am, runtime_gather_output=gather)
                    assert torch.equal(a, b), "logits without labels changed"
            # Training mode, with autograd, no labels: logits and their gradients are Megatron's.
            ref.train()
            new.train()
            a, b = ref(ids, pos, am), new(ids, pos, am)
            assert torch.equal(a, b)
            # Checkpoints load either way (same names, same tensors).
            new.load_state_dict(ref.state_dict(), strict=True)
            ref.load_state_dict(new.state_dict(), strict=True)
            # Unpatching restores the native path.
            vm.unpatch_gpt_model(new)
            assert not vm.is_patched(new)
            assert "forward" not in new.__dict__ and "forward" not in new.output_layer.__dict__
    return True


@pytest.mark.exact
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_logits_and_checkpoints_unchanged(sp):
    spawn(_logits_and_ckpt, 2, sp)


# --------------------------------------------------------------------------- options vs a reference


def _reference_loss(logits, labels, *, label_smoothing=0.0, z_loss=0.0, softcap=None, true_vocab=None):
    """Per-token loss [b, s] from full logits [b, s, V] (float64 math)."""
    z = logits.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if true_vocab is not None:
        z = z[..., :true_vocab]
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = (1 - label_smoothing) * nll + label_smoothing * (lse - z.mean(-1))
    return loss + z_loss * lse * lse


def _options_compare(rank, world, sp, cases):
    with cpu_megatron():
        init_parallel(world)
        for opts in cases:
            ref = build_gpt(world, sequence_parallel=sp)
            new = build_gpt(world, sequence_parallel=sp)
            vm.patch_gpt_model(new, **opts)
            ids, pos, am, labels, lm = batch(seed=3, vocab=VOCAB - 7)
            ref_opts = {k: v for k, v in opts.items() if k != "true_vocab_size"}
            ref_opts["true_vocab"] = opts.get("true_vocab_size")
            logits = ref(ids, pos, am, runtime_gather_output=True)  # [b, s, V], autograd through the gather
            want = _reference_loss(logits, labels, **ref_opts).float()
            got = new(ids, pos, am, labels=labels, loss_mask=lm)
            _close(got, want, f"per-token loss {opts}")
            ((want * lm).sum() / lm.sum()).backward()
            ((got * lm).sum() / lm.sum()).backward()
            gr, gn = _grads(ref), _grads(new)
            for name in gr:
                _close(gn[name], gr[name], f"{opts}: grad of {name}")
    return True


OPTION_CASES = [
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"true_vocab_size": VOCAB},
    {"label_smoothing": 0.2, "z_loss": 1e-4, "true_vocab_size": VOCAB - 7},
]


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"])
def test_loss_options_match_reference(tp, sp):
    spawn(_options_compare, tp, sp, OPTION_CASES)


def _label_smoothing_vs_megatron(rank, world):
    """At TP = 1 Megatron's smoothing α equals ours with ε = α·K/(K−1) (K = padded vocabulary)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    with cpu_megatron():
        init_parallel(world)
        alpha = 0.1
        k = padded_vocab(1)
        ref = build_gpt(1)
        new = build_gpt(1)
        vm.patch_gpt_model(new, label_smoothing=alpha * k / (k - 1))
        ids, pos, am, labels, lm = batch(seed=5)
        logits = ref(ids, pos, am).transpose(0, 1)  # [s, b, V]
        want = vocab_parallel_cross_entropy(logits.contiguous(), labels.t().contiguous(), alpha).t()
        got = new(ids, pos, am, labels=labels)
        _close(got, want, "label smoothing vs Megatron at TP=1")
    return True


def test_label_smoothing_matches_megatron_at_tp1():
    spawn(_label_smoothing_vs_megatron, 1)


# --------------------------------------------------------------------------- main_grad / DDP


def _ddp_compare(rank, world, tied, fusion, gif=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    with cpu_megatron():
        init_parallel(world)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        ref = build_gpt(world, tied=tied)
        new = build_gpt(world, tied=tied)
        if fusion:
            # Megatron's own fused wgrad needs CUDA; only the patched head uses fusion here, which is
            # what matters: its classifier gradient must land in main_grad exactly once.
            new.output_layer.gradient_accumulation_fusion = True
        ref = DistributedDataParallel(ref.config, ddp_cfg, ref)
        new = vm.patch_gpt_model(DistributedDataParallel(new.config, ddp_cfg, new), grad_in_forward=gif)
        for step in range(2):  # two micro-batches accumulate into main_grad
            ids, pos, am, labels, lm = batch(seed=step)
            for m in (ref, new):
                loss = m(ids, pos, am, labels=labels, loss_mask=lm)
                ((loss * lm).sum() / lm.sum()).backward()
        g_ref = {n: p.main_grad.clone() for n, p in ref.module.named_parameters()}
        for n, p in new.module.named_parameters():
            _close(p.main_grad, g_ref[n], f"tied={tied} fusion={fusion}: main_grad of {n}")
            assert p.grad is None, f"{n}: .grad left behind after Megatron's DDP hook"
        if fusion:
            head = new.module.shared_embedding_or_output_weight() if tied else new.module.output_layer.weight
            assert head.grad_added_to_main_grad, "the fused head did not accumulate into main_grad"
    return True


@pytest.mark.parametrize("fusion", [False, True], ids=["ddp", "ddp-gradfusion"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_megatron_ddp_main_grad(tied, fusion):
    spawn(_ddp_compare, 2, tied, fusion)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_megatron_ddp_main_grad_fast_mode_accumulates_into_it(tied):
    """grad_in_forward=True with gradient-accumulation fusion: the held-logits path adds dC straight
    into the float32 main_grad (dc_accumulate_into), over two micro-batches, as the native layer's."""
    spawn(_ddp_compare, 2, tied, True, True)


# --------------------------------------------------------------------------- pipeline parallel


def _pipeline_last_stage(rank, world, tied):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    with cpu_megatron():
        init_parallel(1, pp=2)
        first = parallel_state.is_pipeline_first_stage()
        last = parallel_state.is_pipeline_last_stage()
        models = []
        for _ in range(2):
            m = build_gpt(1, tied=tied, pre_process=first, post_process=last, pp=2)
            assert isinstance(m, GPTModel)
            models.append(m)
        ref, new = models
        vm.patch_gpt_model(new)
        assert vm.is_patched(new)
        ids, pos, am, labels, lm = batch()
        if not last:
            # No head on this stage: the patch changes nothing.
            assert "forward" not in new.__dict__
            with torch.no_grad():
                assert torch.equal(ref(ids, pos, am), new(ids, pos, am))
            return True
        g = torch.Generator().manual_seed(9)
        x = torch.randn(SEQ, ids.shape[0], HIDDEN, generator=g)
        outs = []
        for m in (ref, new):
            inp = x.clone().requires_grad_(True)
            m.set_input_tensor(inp)
            loss = m(None, pos, am, labels=labels, loss_mask=lm)
            ((loss * lm).sum() / lm.sum()).backward()
            outs.append((loss.detach(), inp.grad, _grads(m)))
        _close(outs[1][0], outs[0][0], "last-stage loss")
        _close(outs[1][1], outs[0][1], "gradient sent to the previous stage")
        for n in outs[0][2]:
            _close(outs[1][2][n], outs[0][2][n], f"grad of {n}")
    return True


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pipeline_parallel_last_stage(tied):
    spawn(_pipeline_last_stage, 2, tied)


# --------------------------------------------------------------------------- MTP metrics (0.18+)


def _mtp_metrics(rank, world):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    with cpu_megatron():
        init_parallel(world)
        ref = build_gpt(world, sequence_parallel=True, mtp_layers=1)
        new = build_gpt(world, sequence_parallel=True, mtp_layers=1)
        vm.patch_gpt_model(new)
        ids, pos, am, labels, lm = batch()
        values = []
        for m in (ref, new):
            MTPLossLoggingHelper.tracker.clear()
            m(ids, pos, am, labels=labels, loss_mask=lm)
            values.append({k: v.clone() for k, v in MTPLossLoggingHelper.tracker.items() if torch.is_tensor(v)})
        assert values[0].keys() == values[1].keys() and values[0]
        for k in values[0]:
            _close(values[1][k], values[0][k], f"MTP tracker {k}")
    return True


@pytest.mark.skipif(MCORE.release[:2] < (0, 19), reason="MTP acceptance metrics exist in megatron-core 0.19")
def test_mtp_metrics_match_native():
    spawn(_mtp_metrics, 2)


# --------------------------------------------------------------------------- errors


def test_rejects_non_gpt_models():
    with pytest.raises(TypeError, match="GPTModel"):
        vm.patch_gpt_model(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("version", [(0, 15, 2), (0, 20, 0), (1, 0, 0)])
def test_rejects_unsupported_megatron_versions(monkeypatch, version):
    monkeypatch.setattr(vm, "megatron_core_version", lambda: version)
    with pytest.raises(RuntimeError, match="supports megatron-core 0.16.x to 0.19.x"):
        vm.patch_gpt_model(torch.nn.Linear(4, 4))


def test_installed_version_is_supported():
    v = vm.megatron_core_version()
    assert vm.SUPPORTED_MIN <= v[:2] < vm.SUPPORTED_MAX


def _option_errors(rank, world):
    with cpu_megatron():
        init_parallel(world)
        m = build_gpt(1)
        with pytest.raises(ValueError, match="true_vocab_size"):
            vm.patch_gpt_model(m, true_vocab_size=padded_vocab(1) + 1)
        with pytest.raises(ValueError, match="label_smoothing"):
            vm.patch_gpt_model(m, label_smoothing=1.5)
        with pytest.raises(ValueError, match="impl"):
            vm.patch_gpt_model(m, impl="nope")
        m.config.defer_embedding_wgrad_compute = True
        with pytest.raises(ValueError, match="defer_embedding_wgrad_compute"):
            vm.patch_gpt_model(m)
        m.config.defer_embedding_wgrad_compute = False
        # A config that asks for a final-logit softcap: used by default, contradicted -> error.
        m.config.final_logit_softcapping = 5.0
        with pytest.raises(ValueError, match="contradicts"):
            vm.patch_gpt_model(m, softcap=3.0)
        vm.patch_gpt_model(m)
        assert m._vp_cce_state.options.softcap == 5.0
        with pytest.raises(RuntimeError, match="already patched"):
            vm.patch_gpt_model(m)
        ref = build_gpt(1)
        ids, pos, am, labels, _ = batch()
        with torch.no_grad():
            want = _reference_loss(ref(ids, pos, am), labels, softcap=5.0).float()
            _close(m(ids, pos, am, labels=labels), want, "config softcap")
    return True


def test_option_errors_and_config_softcap():
    spawn(_option_errors, 1)


@pytest.mark.exact
def test_deferred_logits_fall_back_to_real_logits():
    """Any unexpected use of the placeholder computes the real logits (with a warning)."""
    spawn(_deferred_fallback, 2)


def _deferred_fallback(rank, world):
    import warnings

    with cpu_megatron():
        init_parallel(world)
        ref = build_gpt(world, sequence_parallel=True)
        new = build_gpt(world, sequence_parallel=True)
        vm.patch_gpt_model(new)
        state = new._vp_cce_state
        ids, pos, am, _, _ = batch()
        with torch.no_grad():
            want, _ = ref.output_layer(torch.ones(SEQ // world, 2, HIDDEN))
            with state.deferring(True):
                d, _ = new.output_layer(torch.ones(SEQ // world, 2, HIDDEN))
            assert isinstance(d, vm.DeferredLogits) and d.shape == want.shape
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                got = (d * 2.0).transpose(0, 1).contiguous()
            assert any("materialises" in str(w.message) for w in rec)
            _close(got, 2.0 * want.transpose(0, 1), "materialised logits")
            vals, idx = d.max(dim=-1)
            wv, wi = want.max(dim=-1)
            _close(vals, wv, "chunked max")
            assert torch.equal(idx, wi) and torch.equal(torch.argmax(d, dim=-1), torch.argmax(want, dim=-1))
            assert math.isfinite(float(vals.sum()))
    return True


def _class_weights_compare(rank, world, sp):
    """class_weights pass through: per-token w[label]·nll (F.cross_entropy's weighted form, also
    with label smoothing over the padded vocabulary), gradients included; a wrong length is refused."""
    import torch.nn.functional as F

    with cpu_megatron():
        init_parallel(world)
        v = padded_vocab(world)
        w = torch.rand(v, generator=torch.Generator().manual_seed(7)) + 0.2
        for opts in ({"label_smoothing": 0.1}, {}):
            ref = build_gpt(world, sequence_parallel=sp)
            new = build_gpt(world, sequence_parallel=sp)
            vm.patch_gpt_model(new, class_weights=w, grad_in_forward=False, **opts)
            ids, pos, am, labels, lm = batch(seed=5)
            logits = ref(ids, pos, am, runtime_gather_output=True)
            want = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), weight=w.double(),
                                   reduction="none", **opts).view(labels.shape).float()
            got = new(ids, pos, am, labels=labels, loss_mask=lm)
            _close(got, want, f"weighted per-token loss {opts}")
            ((want * lm).sum() / lm.sum()).backward()
            ((got * lm).sum() / lm.sum()).backward()
            gr, gn = _grads(ref), _grads(new)
            for name in gr:
                _close(gn[name], gr[name], f"class weights {opts}: grad of {name}")
        with pytest.raises(ValueError, match="^class_weights: expected"):
            vm.patch_gpt_model(build_gpt(world), class_weights=torch.ones(v + 1))
    return True


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
def test_class_weights_pass_through(tp, sp):
    spawn(_class_weights_compare, tp, sp)
