#!/bin/bash
# one GPU call: sparse kernel configs, random1 regime vs Apple, grad / split sweeps
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
timeout 100 python3 benchmarks/tune_kernels.py --sparse-only --out $OUT > $OUT/sparse.txt 2>&1
timeout 200 python3 benchmarks/bench_loss.py --kinds random1 --methods vpcce_triton,vpcce_triton_filter,apple_cce --peak-tflops 790 --check-dc --out $OUT/r1 > $OUT/r1.txt 2>&1
for shape in 8192x2304x256000 8192x4096x128256; do
  for env in "X=0" "VPCCE_GRAD_CONFIG=128,256,64,8,3" "VPCCE_GRAD_CONFIG=128,256,64,8,4" "VPCCE_SPLITS=17" "VPCCE_SPLITS=33" "VPCCE_MM_CONFIG=128,128,128,8,8,3"; do
    env $env timeout 60 python3 benchmarks/bench_loss.py --shapes $shape --kinds zipf --methods vpcce_triton,vpcce_triton_filter --no-check --stats-tokens 0 --peak-tflops 790 --reps 8 --out $OUT/sw > $OUT/sw.txt 2>&1
    grep "^| 8192" $OUT/sw/bench_loss.md | sed "s/^/$env /" >> $OUT/sweep.md
  done
done
grep "^| sparse" $OUT/sparse.txt | grep -v "f=0.0"
grep "^| 8192" $OUT/r1/bench_loss.md
cat $OUT/sweep.md
