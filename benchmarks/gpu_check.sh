#!/bin/bash
# one GPU call (nvidia-h200): GPU tests on the final code, Hugging Face Llama-shaped training step
# (unpatched / ours / ours grad_in_forward / Liger).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/liger*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
mkdir -p $OUT/r
timeout 150 python3 -m pytest -q tests/test_gpu.py > $OUT/r/test_gpu.txt 2>&1
timeout 240 python3 benchmarks/bench_transformers.py --out $OUT/r/hf > $OUT/r/hf.txt 2>&1
tar czf $OUT/all.tgz -C $OUT r
tail -2 $OUT/r/test_gpu.txt; tail -7 $OUT/r/hf.txt
