#!/bin/bash
# one GPU call (nvidia-h200, carry .whl): Megatron GPT steps at tp=1, SEQ x MB tokens per step
# (arguments; default 1024 x 16 = 16384, where Megatron's logits, 16384 x 128256, set the step's
# peak memory; with 4096 x 4 the local spec's attention scores do): ours (grad_in_forward, then the
# default path) vs Megatron fused CE, same run each. Everything in $OUT/all.tgz.
#   bash benchmarks/gpu_gpt_tokens.sh 1024 16
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/megatron*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
R=$OUT/r; mkdir -p $R
SEQ=${1:-1024} MB=${2:-16}
GPT="--layers 2 --hidden 4096 --heads 32 --ffn-hidden 14336 --seq-len $SEQ --vocab-size 128256 --lexicon 32000
     --corpus-tokens 400000 --micro-batch $MB --loss both --native-fused-ce --steps 8"
timeout 150 torchrun --nproc-per-node 1 launch/train_gpt.py $GPT --fused-grad-in-forward --out $R/gif > $R/gif.log 2>&1
timeout 120 torchrun --nproc-per-node 1 launch/train_gpt.py $GPT --loss fused --out $R/default > $R/default.log 2>&1
tar czf $OUT/all.tgz -C $OUT r
for f in gif default; do grep -v "\[#" $R/$f.log | grep -E "^ *(fused|native):|difference" ; done
