#!/usr/bin/env bash
# GPU session 1 (nvidia-h200-x2): smoke of every GPU path + first profile. Each step runs on its
# own, so one failure does not hide the others. Results under $OUT.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
step() { echo "=== $1 ($(date +%T))"; shift; timeout "$@"; echo "=== exit $? ($(date +%T))"; }
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
python3 -c "import torch, megatron.core, transformers, triton; print(torch.__version__, megatron.core.__version__, transformers.__version__, triton.__version__)"
step envcheck 120 bash -c "python3 scripts/check_megatron_env.py --json --workdir /tmp > $OUT/envcheck-h200x2.json; python3 scripts/check_megatron_env.py --print-te-env > $OUT/te-env.txt 2>&1"
step sft-smoke 420 python3 benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 30 --log-every 5 --rows 6000 --layouts tp1:1,tp2:2 --out /tmp/sft --json $OUT/sft-smoke.json
step tp-eager 300 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime --option fused_norm=false --option fused_rope=false --label eager-norm-rope --steps 5 --json $OUT/throughput.json
step tp-fused 420 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime,hf --label fused --profile $OUT/profile-1.7b.txt --json $OUT/throughput.json
step convert-tp1 420 python3 benchmarks/convert_evidence.py --out $OUT/convert-tp1.json
for f in /tmp/sft/*.log; do echo "--- $f"; tail -5 "$f"; done
