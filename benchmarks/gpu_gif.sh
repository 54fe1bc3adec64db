#!/bin/bash
# one GPU call: GPU tests; vocabulary-parallel bench at tp=1 (vs Megatron, same run); single-GPU
# bench per input kind (one process each, so the adaptive skip policy sees one kind), with
# grad_in_forward and the alternatives.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:. NCCL_NVLS_ENABLE=0
timeout 170 python3 -m pytest -x -q tests/test_gpu.py > $OUT/test_gpu.txt 2>&1; tail -3 $OUT/test_gpu.txt
timeout 170 torchrun --nproc-per-node 1 benchmarks/bench_vocab_parallel.py --out $OUT/vp1 > $OUT/vp1.txt 2>&1
grep "^| 1 " $OUT/vp1/*.md
for kind in random1 zipf random; do
  timeout 110 python3 benchmarks/bench_loss.py --kinds $kind --methods vpcce_triton,vpcce_triton_dense,vpcce_triton_gif,apple_cce,torch_compile,liger --check-dc --out $OUT/bl_$kind > $OUT/bl_$kind.txt 2>&1
  grep "^| 8192" $OUT/bl_$kind/bench_loss.md
done
