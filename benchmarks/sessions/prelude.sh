# Sourced by the GPU session scripts: environment, megatron-core from the carried wheel, helpers.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -d /tmp/site/megatron ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
# step NAME SECONDS CMD...: run one step with a time limit; a failure does not stop the session
step() { local name=$1; shift; echo "=== $name ($(date +%T))"; timeout "$@"; echo "=== $name exit $? ($(date +%T))"; }
