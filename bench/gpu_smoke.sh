#!/usr/bin/env bash
# GPU smoke run (not part of CI): both stages with bf16 and gradient checkpointing, then stage 2 under the shipped
# FSDP config (one process), then the training benchmark. Tiny random models made on the spot; prints what it measured.
set -euo pipefail
work=${1:-/tmp/llava-gpu-smoke}
rm -rf "$work" && mkdir -p "$work"
python3 - "$work" <<'PY'
import sys; from pathlib import Path
sys.path.insert(0, "tests")
from tiny_components import save_clip, save_llm, save_tiny_world
root = Path(sys.argv[1]); save_llm(root / "llm"); save_clip(root / "clip"); save_tiny_world(root / "world", images=96)
PY
w=$work/world
python3 -m trainer.cli --stage 1 --vision "$work/clip" --llm "$work/llm" --data "$w/captions.json" --image-folder "$w/images" \
  --output "$work/s1" --max-steps 20 --batch-size 8 --lr 1e-3 --mixed-precision bf16 --save-every 10 2>&1 | grep -E "stage 1 on|trained|saved"
python3 -m trainer.cli --stage 2 --model "$work/s1" --data "$w/instruct.json" --image-folder "$w/images" --output "$work/s2" \
  --max-steps 20 --batch-size 8 --mixed-precision bf16 --gradient-checkpointing --save-every 10 2>&1 | grep -E "stage 2 on|trained|saved"
accelerate launch --config_file trainer/accelerate_configs/fsdp.yaml --num_processes 1 -m trainer.cli --stage 2 --model "$work/s1" \
  --data "$w/instruct.json" --image-folder "$w/images" --output "$work/fsdp" --max-steps 10 --batch-size 8 --save-every 5 \
  2>&1 | grep -E "stage 2 on|trained|saved|Error"
python3 - "$work" <<'PY'
import sys, torch
from transformers import AutoModel, AutoProcessor
from PIL import Image
for name in ("s2", "fsdp"):
    path = f"{sys.argv[1]}/{name}"
    model = AutoModel.from_pretrained(path, trust_remote_code=True).cuda().eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the picture?"}]}], add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (60, 40), (230, 20, 20)), text=prompt, return_tensors="pt").to("cuda")
    ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(name, "loads on", model.device, "and answers:", repr(processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
PY
python3 bench/bench_train.py --steps 40 2>&1 | grep -E "^[0-9]\."
