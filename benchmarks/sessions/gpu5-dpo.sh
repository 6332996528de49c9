#!/usr/bin/env bash
# GPU session 5 (nvidia-h200, 2026-12-04): DPO throughput, runtime vs TRL's DPOTrainer, Qwen3-1.7B
# shape, pairs of ~1,000-token sequences, bf16. Carried in .whl/: megatron-core, trl 1.16.0,
# datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19 (the image has none of them; its pyarrow
# 25.0.1 satisfies datasets, so .whl/opt/pyarrow was not installed).
source benchmarks/sessions/prelude.sh
(python3 -c "import pyarrow,sys; sys.exit(int(pyarrow.__version__.split('.')[0])<24)" \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/opt/*.whl)
timeout 200 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --micro-batch 2 \
  --warmup 2 --steps 5 --label h200-dpo --json $OUT/dpo-throughput.json
