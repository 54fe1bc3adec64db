#!/bin/bash
# one GPU call (nvidia-h200, carry .whl): GPU tests; Megatron GPT steps at tp=1: ours with
# grad_in_forward vs Megatron fused CE (same run). Everything in $OUT/all.tgz.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/megatron*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
R=$OUT/r; mkdir -p $R
timeout 130 python3 -m pytest -q tests/test_gpu.py > $R/test_gpu.txt 2>&1
GPT="--layers 2 --hidden 4096 --heads 32 --ffn-hidden 14336 --seq-len 4096 --vocab-size 128256 --lexicon 32000
     --corpus-tokens 300000 --micro-batch 1 --loss both --native-fused-ce"
timeout 130 torchrun --nproc-per-node 1 launch/train_gpt.py $GPT --steps 10 --fused-grad-in-forward \
  --out $R/gpt_tp1_gif > $R/gpt_tp1_gif.log 2>&1
tar czf $OUT/all.tgz -C $OUT r
tail -2 $R/test_gpu.txt; grep -v "\[#" $R/gpt_tp1_gif.log | grep -E "loss|native|fused" | tail -5
