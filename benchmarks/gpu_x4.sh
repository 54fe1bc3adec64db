#!/usr/bin/env bash
# One call on a 4-GPU H200 machine (device tool, kind nvidia-h200-x4, carry .whl):
# GPU tests, vocabulary-parallel loss benchmark (tp 1, 2, 4: ours default and grad_in_forward vs
# Megatron unfused / fused), Megatron GPT training steps with our fused loss (grad_in_forward) vs
# Megatron's fused cross-entropy at tp 4 and tp 2, 16384 tokens per step (seq 1024 x micro-batch 16,
# where Megatron's logits set the step's peak memory). Everything lands in $OUT/all.tgz; the tables
# are printed last.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/megatron*.whl || exit 1
export PYTHONPATH=/tmp/site:.
R=$OUT/r; mkdir -p $R
nvidia-smi topo -m > $R/topo.txt 2>&1
timeout 100 python3 -m pytest -q tests/test_gpu.py > $R/gpu_tests.log 2>&1
for tp in 1 2 4; do
  timeout 80 torchrun --nproc-per-node $tp benchmarks/bench_vocab_parallel.py --no-fwd --reps 6 --warmup 2 \
    --out $R/vp > $R/vp_tp$tp.log 2>&1
done
GPT="--layers 2 --hidden 4096 --heads 32 --ffn-hidden 14336 --seq-len 1024 --vocab-size 128256 --lexicon 32000
     --corpus-tokens 400000 --micro-batch 16 --loss both --native-fused-ce --fused-grad-in-forward"
timeout 95 torchrun --nproc-per-node 4 launch/train_gpt.py $GPT --steps 12 --out $R/gpt_tp4 > $R/gpt_tp4.log 2>&1
CUDA_VISIBLE_DEVICES=0,1 timeout 80 torchrun --nproc-per-node 2 launch/train_gpt.py $GPT --steps 8 \
  --out $R/gpt_tp2 > $R/gpt_tp2.log 2>&1
tar czf $OUT/all.tgz -C $OUT r
tail -4 $R/gpu_tests.log
for tp in 1 2 4; do cat $R/vp/bench_vp_tp$tp.md 2>/dev/null | grep -E "^\|" || tail -5 $R/vp_tp$tp.log; done
tail -6 $R/gpt_tp4.log; tail -6 $R/gpt_tp2.log
