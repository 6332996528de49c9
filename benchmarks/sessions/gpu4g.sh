#!/usr/bin/env bash
# GPU session 4g (nvidia-h200): the q/k kernel launch settings chosen from 4f's sweep (2 warps;
# backward 4 programs per SM): kernel tests, and Qwen3-1.7B against Hugging Face.
source benchmarks/sessions/prelude.sh
step gpu-tests 100 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu > $OUT/gpu-tests.txt 2>&1; tail -3 $OUT/gpu-tests.txt"
step sweep 100 python3 benchmarks/qk_kernel_sweep.py --shape qwen3-1.7b --json $OUT/qk-sweep.json
step final-mb1 200 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json --warmup 3 --steps 10 --impl runtime,hf --label final-qk-tuned
# (second call on the same warm machine)
# step final-mb2 200 $T --impl runtime,hf --label final-qk-tuned-mb2 --micro-batch 2
# step profile 120 $T --impl runtime --label final-qk-tuned-profiled --profile $OUT/profile-1.7b-final.txt
