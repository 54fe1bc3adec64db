#!/bin/bash
# one GPU call: GPU tests, then G chunks inside dC's storage (VPCCE_G_IN_DC) × grad-kernel
# grouping (VPCCE_GROUP_V), fwd+bwd at both shapes, dense and skipping.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
timeout 200 python3 -m pytest -x -q tests/test_gpu.py > $OUT/test_gpu.txt 2>&1; tail -2 $OUT/test_gpu.txt
for shape in 8192x2304x256000 8192x4096x128256; do
  for env in "VPCCE_G_IN_DC=0" "VPCCE_G_IN_DC=1" "VPCCE_GROUP_V=8" "VPCCE_GROUP_V=24"; do
    env $env timeout 90 python3 benchmarks/bench_loss.py --shapes $shape --kinds random,zipf --methods vpcce_triton,vpcce_triton_dense --no-check --no-fwd --stats-tokens 0 --peak-tflops 790 --reps 8 --out $OUT/sw > $OUT/sw.txt 2>&1
    grep "^| 8192" $OUT/sw/bench_loss.md | sed "s/^/$env /" >> $OUT/sweep.md
  done
done
cat $OUT/sweep.md
