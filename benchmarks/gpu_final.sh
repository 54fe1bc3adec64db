#!/bin/bash
# one GPU call (nvidia-h200, carry .whl): GPU tests; grad_in_forward vs the default path and
# torch.compile per input kind; its chunk size; vocabulary-parallel tp=1 vs Megatron fused;
# Megatron GPT steps at tp=1 (native fused CE vs ours). Everything in $OUT/all.tgz, tables last.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
R=$OUT/r; mkdir -p $R
timeout 120 python3 -m pytest -x -q tests/test_gpu.py > $R/test_gpu.txt 2>&1
for kind in zipf random; do
  timeout 90 python3 benchmarks/bench_loss.py --kinds $kind --methods vpcce_triton,vpcce_triton_gif,torch_compile \
    --no-fwd --out $R/bl_$kind > $R/bl_$kind.txt 2>&1
done
for ch in 2048 8192; do
  VPCCE_GIF_CHUNK=$ch timeout 60 python3 benchmarks/bench_loss.py --shapes 8192x4096x128256 --kinds zipf \
    --methods vpcce_triton_gif --no-fwd --no-check --stats-tokens 0 --out $R/chunk$ch > $R/chunk$ch.txt 2>&1
done
timeout 100 torchrun --nproc-per-node 1 benchmarks/bench_vocab_parallel.py --methods vpcce,vpcce_gif,megatron_fused \
  --out $R/vp > $R/vp_tp1.txt 2>&1
GPT="--layers 2 --hidden 4096 --heads 32 --ffn-hidden 14336 --seq-len 4096 --vocab-size 128256 --lexicon 32000
     --corpus-tokens 300000 --micro-batch 1 --loss both --native-fused-ce"
timeout 130 torchrun --nproc-per-node 1 launch/train_gpt.py $GPT --steps 10 --out $R/gpt_tp1 > $R/gpt_tp1.log 2>&1
tar czf $OUT/all.tgz -C $OUT r
tail -2 $R/test_gpu.txt
grep -h "^| 8192" $R/bl_*/bench_loss.md $R/chunk*/bench_loss.md
grep "^| 1 " $R/vp/*.md
tail -8 $R/gpt_tp1.log
