"""vocab_parallel_cce.transformers.patch: tiny random models of each family, patched vs unpatched (CPU)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vocab_parallel_cce.transformers import SUPPORTED_MODEL_TYPES, patch, unpatch  # noqa: E402

VOCAB, SEQ, BATCH = 320, 16, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,  # logits of order 1, so softcapping matters
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def make_config(model_type: str):
    c = transformers
    name = {"gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config", "qwen2": "Qwen2Config"}.get(
        model_type, model_type.capitalize() + "Config"
    )
    if not hasattr(c, name):
        pytest.skip(f"transformers {c.__version__} has no {name}")
    if model_type == "llama":
        return c.LlamaConfig(**COMMON)
    if model_type == "mistral":
        return c.MistralConfig(**COMMON, sliding_window=None)
    if model_type == "phi3":
        return c.Phi3Config(**COMMON)
    if model_type == "gemma2":
        return c.Gemma2Config(**COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=2.0)
    if model_type == "gemma3_text":
        return c.Gemma3TextConfig(**COMMON, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=2.0)
    if model_type == "qwen2":
        return c.Qwen2Config(**COMMON)
    if model_type == "qwen3":
        return c.Qwen3Config(**COMMON, head_dim=8)
    raise KeyError(model_type)


def make_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(model_type), attn_implementation="eager")
    return model.float().train()


def make_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding in the second sequence
    ids[1, 11:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # an ignored prompt
    return ids, mask, labels


def assert_same_grads(patched, ref, rtol=1e-4):
    for (name, p), (_, q) in zip(patched.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        scale = q.grad.abs().max().clamp(min=1e-12)
        err = ((p.grad - q.grad).abs().max() / scale).item()
        assert err < rtol, f"{name}: relative gradient error {err:.2e}"


def run_pair(patched, ref, **kwargs):
    for m in (patched, ref):
        m.zero_grad(set_to_none=True)
    out = patched(**kwargs)
    expect = ref(**kwargs)
    out.loss.backward()
    expect.loss.backward()
    return out, expect


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_family_loss_and_grads_match(model_type):
    ref = make_model(model_type)
    model = patch(copy.deepcopy(ref), impl="torch")
    ids, mask, labels = make_batch()

    out, expect = run_pair(model, ref, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and type(out) is type(expect)
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)

    # num_items_in_batch (e.g. gradient accumulation): sum / N, as Transformers does
    n = torch.tensor(41)
    out, expect = run_pair(model, ref, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)

    # without labels: the original forward, logits and all
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_training_loop_same_losses(model_type):
    ref = make_model(model_type)
    model = patch(copy.deepcopy(ref), impl="torch")
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, ref)]
    losses = {0: [], 1: []}
    ids, mask, labels = make_batch()
    for _ in range(4):
        n = (labels[:, 1:] != -100).sum() + 3  # as if accumulated with another micro-batch
        for i, (m, opt) in enumerate(zip((model, ref), opts)):
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=1e-5)
    assert losses[1][-1] < losses[1][0]


def test_eval_mode_and_eval_logits():
    ref = make_model("qwen2").eval()
    ids, mask, labels = make_batch()
    model = patch(copy.deepcopy(ref), impl="torch")
    with torch.no_grad():
        out, expect = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)

    patch(model, eval_logits=True, impl="torch")  # re-patching replaces the options
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, expect.logits)
    torch.testing.assert_close(out.loss, expect.loss)
    model.train()
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is None


def test_shift_labels_return_dict_false_and_positional_labels():
    ref = make_model("llama")
    model = patch(copy.deepcopy(ref), impl="torch")
    ids, mask, labels = make_batch()
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shift[0, 7] = -100

    out, expect = run_pair(model, ref, input_ids=ids, labels=labels, shift_labels=shift)
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)

    out = model(ids, mask, labels=labels, return_dict=False, use_cache=False)
    expect = ref(ids, mask, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and len(out) == len(expect) - 1  # no logits
    torch.testing.assert_close(out[0], expect[0], atol=1e-5, rtol=1e-5)

    # labels given positionally (6th argument of LlamaForCausalLM.forward)
    out = model(ids, mask, None, None, None, labels)
    torch.testing.assert_close(out.loss, expect[0], atol=1e-5, rtol=1e-5)


def test_patch_model_type_string_patches_the_class():
    cls = transformers.Qwen2ForCausalLM
    original = cls.forward
    try:
        assert patch("qwen2", impl="torch") is cls
        assert patch("qwen2", impl="torch") is cls  # idempotent
        ids, mask, labels = make_batch()
        model = make_model("qwen2")
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        unpatch("qwen2")
        assert cls.forward is original
        expect = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
    finally:
        unpatch("qwen2")
    assert cls.forward is original


def test_unpatch_instance():
    model = patch(make_model("mistral"), impl="torch")
    unpatch(model)
    assert "forward" not in model.__dict__
    ids, _, labels = make_batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def _tiny(config_cls, **extra):
    torch.manual_seed(0)
    cfg = config_cls(**extra)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().train()


def test_generic_path_gpt2():
    ref = _tiny(transformers.GPT2Config, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*generic=True"):
        patch(copy.deepcopy(ref))
    model = patch(copy.deepcopy(ref), generic=True, impl="torch")
    ids, mask, labels = make_batch()
    out, expect = run_pair(model, ref, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


def test_generic_path_refuses_scaled_logits():
    model = _tiny(transformers.CohereConfig, **{**COMMON, "initializer_range": 0.02}, logit_scale=0.5)
    model = patch(model, generic=True, impl="torch")
    ids, _, labels = make_batch()
    with pytest.raises(RuntimeError, match="transforms the logits"):
        model(input_ids=ids, labels=labels)


def test_errors():
    with pytest.raises(ValueError, match="unsupported model type 'bert'"):
        patch("bert")
    with pytest.raises(ValueError, match="gemma3_text"):
        patch("gemma3")
    with pytest.raises(ValueError, match="set by the integration"):
        patch("llama", softcap=3.0)
    with pytest.raises(TypeError, match="unknown loss option"):
        patch("llama", not_an_option=1)
    with pytest.raises(TypeError, match="model-type string or a torch.nn.Module"):
        patch(42)
    assert transformers.LlamaForCausalLM.forward.__name__ == "forward"
    assert not hasattr(transformers.LlamaForCausalLM.forward, "__vpcce_original_forward__")

    ids, _, labels = make_batch()
    model = patch(make_model("llama"), impl="torch")
    model.loss_function = lambda *a, **k: torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="ForCausalLMLoss"):
        model(input_ids=ids, labels=labels)
    model = patch(make_model("llama"), impl="torch")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(TypeError, match="not a torch.nn.Linear"):
        model(input_ids=ids, labels=labels)


def test_transformers_version_check(monkeypatch):
    module = sys.modules["transformers"]  # Transformers may have replaced its module object since import
    for bad in ("4.49.0", "6.0.0.dev0", "3.5.1"):
        monkeypatch.setattr(module, "__version__", bad)
        with pytest.raises(RuntimeError, match="supports transformers >=4.50,<6"):
            patch("llama")


def test_transformers_is_optional(monkeypatch):
    code = "import sys, vocab_parallel_cce, vocab_parallel_cce.transformers; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"vocab_parallel_cce\[transformers\]"):
        patch("llama")


# ------------------------------------------------------------------------------------------
# tensor parallel: lm_head.weight a DTensor sharded along the vocabulary (2 processes, gloo)


def _tp_worker(rank: int, world: int):
    """Yields (case, ok, message) for process_groups.run_group; runs inside an initialised gloo group."""
    import traceback

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**COMMON, "vocab_size": 301})  # uneven shards: 151 + 150
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().train()
    model = copy.deepcopy(ref)
    w = model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(0)]))
    patch(model, impl="torch")

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 301, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[1, 9:] = -100
    try:
        out, expect = run_pair(model, ref, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(23))
        torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
        yield "loss", True, ""
    except Exception:  # noqa: BLE001
        yield "loss", False, traceback.format_exc()
        return
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        grad = p.grad.full_tensor() if name == "lm_head.weight" else p.grad
        err = ((grad - q.grad).abs().max() / q.grad.abs().max()).item()
        yield f"grad {name}", err < 1e-4, f"relative error {err:.2e}"


def test_tensor_parallel_dtensor_lm_head():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from support.process_groups import failures, run_group

    results = run_group(_tp_worker, 2, timeout_s=300)
    assert not failures(results), "\n".join(failures(results))
    assert len(results[0]) > 10 and len(results[1]) > 10


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_class_weights_pass_through(model_type):
    """patch(model, class_weights=w, label_smoothing=ε): the loss of F.cross_entropy(weight=w) on the
    shifted (softcapped) logits; the flags that change linear_cross_entropy's return type are refused."""
    import torch.nn.functional as F

    ref = make_model(model_type)
    w = torch.rand(VOCAB, generator=torch.Generator().manual_seed(3)) + 0.2
    model = patch(copy.deepcopy(ref), impl="torch", class_weights=w, label_smoothing=0.1)
    ids, mask, labels = make_batch()
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    logits = ref(input_ids=ids, attention_mask=mask).logits  # Gemma 2's softcap applied by the model
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), weight=w,
                           label_smoothing=0.1)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    want.backward()
    assert_same_grads(model, ref)
    for flag in ("return_z_loss", "return_token_accuracy", "return_predicted_tokens"):
        with pytest.raises(ValueError, match="set by the integration"):
            patch(copy.deepcopy(ref), **{flag: True})
