"""Training step of a Hugging Face causal LM: unpatched vs vocab_parallel_cce.transformers.patch
(default, and with grad_in_forward=True) vs Liger's patch when installed. One GPU.

    PYTHONPATH=. python3 benchmarks/bench_transformers.py --out results/hf [--layers 2 --seq 8192]

Model: a Llama-3-8B-shaped config (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256)
with few layers and random weights, bf16. Step = forward with labels + backward (no optimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def build(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, num_hidden_layers=layers, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def measure(model, ids, labels, reps: int):
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    for _ in range(2):
        loss = step()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20, float(loss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_transformers")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    ids = torch.randint(0, 128256, (args.batch, args.seq), device="cuda")
    labels = ids.clone()
    labels[:, :16] = -100
    rows = []
    for method in ("unpatched", "vpcce", "vpcce_gif", "liger"):
        model = build(args.layers, seed=0)
        try:
            if method in ("vpcce", "vpcce_gif"):
                from vocab_parallel_cce.transformers import patch

                patch(model, grad_in_forward=method == "vpcce_gif")
            elif method == "liger":
                from liger_kernel.transformers import apply_liger_kernel_to_llama

                apply_liger_kernel_to_llama(model=model, fused_linear_cross_entropy=True, cross_entropy=False)
            ms, mb, loss = measure(model, ids, labels, args.reps)
            rows.append(dict(method=method, step_ms=ms, peak_mb=mb, loss=loss))
        except Exception as err:  # record and go on
            rows.append(dict(method=method, error=repr(err)[:300]))
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "bench_transformers.json"), "w") as f:
        json.dump(dict(args=vars(args), device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    print(f"\n| method | step ms (fwd+bwd) | peak MB added | loss |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r.get('step_ms', float('nan')):.1f} | {r.get('peak_mb', float('nan')):.0f} | "
              f"{r.get('loss', r.get('error'))} |")


if __name__ == "__main__":
    main()
