#!/usr/bin/env bash
# GPU session 4f (nvidia-h200): kernel-time sweep of the launch settings of the fused q/k kernel
# and the RMSNorm backward (`benchmarks/qk_kernel_sweep.py`).
source benchmarks/sessions/prelude.sh
step sweep 200 python3 benchmarks/qk_kernel_sweep.py --shape qwen3-1.7b --json $OUT/qk-sweep.json
