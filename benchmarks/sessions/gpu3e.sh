#!/usr/bin/env bash
# GPU session 3e (nvidia-h200): conversion evidence again with the "decided positions" argmax
# metric (random Qwen3-1.7B), then a trained checkpoint: 100 SFT steps of a Qwen3-0.6B-shaped model
# and check-convert on it, on its own chat data and on the built-in English sample.
source benchmarks/sessions/prelude.sh
step convert-tp1 200 python3 benchmarks/convert_evidence.py --out $OUT/convert-tp1.json
step sft-100 200 python3 benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 100 --log-every 10 --rows 20000 --micro-batch 4 --layouts tp1:1 --out /tmp/sft --json $OUT/sft-100.json
python3 - <<'PY'
import json
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/sft/tp1/checkpoint-100")
rows = [json.loads(l) for l in open("/tmp/sft/data.jsonl").read().splitlines()[:40]]
text = "".join(tok.apply_chat_template(r["messages"], tokenize=False) for r in rows)
open("/tmp/chat-sample.txt", "w").write(text)
PY
step check-trained-chat 150 bash -c "python3 -m remote_runtime check-convert --model /tmp/sft/tp1/checkpoint-100 --seq_length 1024 --batch_size 4 --text_file /tmp/chat-sample.txt --json > $OUT/check-trained-chat.json; python3 -m remote_runtime check-convert --model /tmp/sft/tp1/checkpoint-100 --seq_length 1024 --batch_size 4 --text_file /tmp/chat-sample.txt"
step check-trained-english 150 bash -c "python3 -m remote_runtime check-convert --model /tmp/sft/tp1/checkpoint-100 --seq_length 1024 --batch_size 4 --json > $OUT/check-trained-english.json; tail -c 600 $OUT/check-trained-english.json"
