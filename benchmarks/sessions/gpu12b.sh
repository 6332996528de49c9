#!/usr/bin/env bash
# GPU session 12, call b: megafleet's AdamW and the fused SwiGLU x router weight through the real
# runtime in the LoRA (MoE) and DPO GPU tests.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step gpu-tests-lora-dpo 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_moe_gpu.py tests/gpu/test_dpo_gpu.py
