"""The model: Megatron-core's GPTModel (local layer spec), and the fused loss patched into it."""

from __future__ import annotations

import copy

import torch

from .args import UsageError


def layer_spec(cfg: dict):
    """Megatron-core's local GPT layer spec. With sequence parallelism its torch LayerNorm refuses
    to run, so the norms are swapped for a LayerNorm that marks its parameters `sequence_parallel`
    (their gradients are then summed over the tensor-parallel group, see sync_grads)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    if not cfg["sequence_parallel"]:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    class SequenceParallelLayerNorm(torch.nn.LayerNorm):
        def __init__(self, config, hidden_size, eps=1e-5, **_unused):
            super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
            for p in self.parameters():
                p.sequence_parallel = True

    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = SequenceParallelLayerNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * cfg["layers"], layer_norm=SequenceParallelLayerNorm)


def build_model(cfg: dict, loss: str = "fused"):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = cfg["dtype"] == "bf16"
    config = TransformerConfig(
        num_layers=cfg["layers"], hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
        ffn_hidden_size=cfg["ffn_hidden"], tensor_model_parallel_size=cfg["tp"],
        sequence_parallel=cfg["sequence_parallel"], hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=cfg["device"] == "cpu", bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        cross_entropy_loss_fusion=loss == "native" and cfg.get("native_fused_ce", False),
    )
    torch.manual_seed(cfg["seed"])
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(cfg), vocab_size=cfg["padded_vocab_size"],
        max_sequence_length=cfg["seq_len"], parallel_output=True,
        share_embeddings_and_output_weights=cfg["tie_embeddings"], position_embedding_type="learned_absolute",
    )
    if bf16:
        model.bfloat16()  # as Megatron's Float16Module does: norms and all, one dtype
    if cfg["device"] == "cuda":
        model.cuda()
    return model


def fused_loss(cfg: dict):
    """(patch_gpt_model, its keyword options) for cfg's fused loss; UsageError naming the reason when
    the fused loss is unavailable or an option is one the library refuses (checked before start)."""
    try:
        from vocab_parallel_cce.planning import check_loss_options
        from vocab_parallel_cce.megatron import patch_gpt_model
    except ImportError as exc:
        raise UsageError(f"--loss {cfg['loss']}: the fused loss is unavailable: vocab_parallel_cce.megatron is "
                         f"not importable ({exc}); use --loss native") from None
    options = {}
    if cfg["fused_impl"] is not None:
        try:
            check_loss_options(None, 0.0, 0.0, impl=cfg["fused_impl"])
        except ValueError as exc:
            raise UsageError(f"--fused-impl {cfg['fused_impl']}: {exc}") from None
        options["impl"] = cfg["fused_impl"]
    if cfg["fused_grad_in_forward"]:
        options["grad_in_forward"] = True
    elif cfg.get("fused_memory_first"):
        options["grad_in_forward"] = False
    return patch_gpt_model, options
