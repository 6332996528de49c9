#!/usr/bin/env bash
# GPU session 7 (nvidia-h200, one GPU): DPO throughput and memory after issue 18, runtime vs TRL
# 1.16, Qwen3-1.7B shape, ~1,000-token sequences, micro-batch sweep, each (implementation, size)
# in its own process (about a minute each). One command per call, each under 10 minutes:
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh full 2,4     # runtime-dpo, runtime-sft, trl at 2 and 4 pairs
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh full 8
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh lora 2,4     # the same with LoRA r=16 on every linear layer
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh lora 8
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh pad 2,4      # runtime-dpo only, micro-batches padded to 128 tokens
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh gputest      # tests/gpu/test_dpo_gpu.py (no host sync in the loss)
# Carried in .whl/ as for session 5: megatron-core, trl 1.16.0, datasets, dill, multiprocess.
source benchmarks/sessions/prelude.sh
(python3 -c "import pyarrow,sys; sys.exit(int(pyarrow.__version__.split('.')[0])<24)" \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/opt/*.whl)
SIZES=${2:-2,4,8}
COMMON=(--shape qwen3-1.7b --global-batch 16 --micro-batch "$SIZES" --warmup 2 --steps 5)
case "${1:-full}" in
  full) step dpo-sweep-full 580 python3 benchmarks/dpo_throughput.py "${COMMON[@]}" \
          --label h200-dpo-sweep --json $OUT/dpo-throughput.json ;;
  lora) step dpo-sweep-lora 580 python3 benchmarks/dpo_throughput.py "${COMMON[@]}" --lora \
          --label h200-dpo-lora-sweep --json $OUT/dpo-throughput-lora.json ;;
  pad)  step dpo-sweep-pad 580 python3 benchmarks/dpo_throughput.py "${COMMON[@]}" --impl runtime-dpo \
          --pad-multiple 128 --label h200-dpo-pad128 --json $OUT/dpo-throughput-pad.json ;;
  gputest) step dpo-gpu-test 300 python3 -m pytest -q tests/gpu/test_dpo_gpu.py ;;
esac
