#!/usr/bin/env bash
# GPU session 2a (nvidia-h200-x2): kernel tests, Qwen3-1.7B ablation vs Hugging Face with a
# profile, conversion evidence at TP=2, the installer's TE-path plan on the real venv.
source benchmarks/sessions/prelude.sh
step gpu-tests 60 bash -c "python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/gpu-tests.txt 2>&1; tail -3 $OUT/gpu-tests.txt"
step tp-cudnn-gaf 150 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime,hf --label cudnn+gaf --warmup 2 --steps 6 --profile $OUT/profile-1.7b-v2.txt --json $OUT/throughput-1.7b.json
step tp-flash-gaf 80 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime --label flash+gaf --attention-backend flash --warmup 2 --steps 6 --json $OUT/throughput-1.7b.json
step tp-recompute 80 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime --label full-recompute --recompute full --recompute-layers 1 --warmup 2 --steps 4 --json $OUT/throughput-1.7b.json
step convert-tp2 150 bash -c "python3 benchmarks/convert_evidence.py --out /tmp/convert-tp1.json > /dev/null 2>&1; torchrun --standalone --nproc_per_node 2 benchmarks/convert_evidence.py --tensor_model_parallel_size 2 --out $OUT/convert-tp2.json"
step setup-plan 30 bash -c "export MEGAFLEET_HOME=\$(mktemp -d); python3 -m megafleet.setup.node plan --with-te --venv /opt/torch/.venv --base-python /opt/torch/.venv/bin/python > $OUT/setup-te-plan.json; echo rc=\$?"
