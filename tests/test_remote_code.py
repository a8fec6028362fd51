"""A saved checkpoint stands on its own: it loads with trust_remote_code where llava_plugin cannot be imported."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from llava_plugin import LlavaPluginForConditionalGeneration
from tiny_components import user_turn

IMAGE_PATH_NAME = "probe.png"

# Runs in a fresh interpreter, offline, with llava_plugin made unimportable.
STANDALONE = r"""
import json, sys
sys.modules["llava_plugin"] = None  # any `import llava_plugin` now raises ImportError
try:
    import llava_plugin
    raise SystemExit("llava_plugin is importable")
except ImportError:
    pass
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

folder, image_path = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image_path, text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits[0, -1]
ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
print(json.dumps({
    "classes": [type(auto.from_pretrained(folder, trust_remote_code=True)).__name__
                for auto in (AutoModelForCausalLM, AutoModelForImageTextToText)],
    "module": type(model).__module__,
    "logits": logits.tolist(),
    "tokens": ids[0, inputs["input_ids"].shape[1]:].tolist(),
    "answer": processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
}))
"""


def run_standalone(folder, image_path):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(folder.parent / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(folder), str(image_path)],
        cwd=folder.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_process(model, processor, image_path):
    prompt = processor.apply_chat_template([user_turn("What is in the picture?")], add_generation_prompt=True)
    inputs = processor(images=image_path, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return logits, ids[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def probe_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / IMAGE_PATH_NAME
    Image.effect_noise((45, 30), 60).convert("RGB").save(path)
    return path


@pytest.mark.parametrize("tower", ["clip", "open_clip"])
def test_checkpoint_loads_and_answers_without_the_package(parts, tower, tmp_path, probe_image):
    torch.manual_seed(1)
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts[tower], llm=parts["llm"])
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    remote = run_standalone(folder, probe_image)
    logits, tokens = in_process(model.eval(), processor, probe_image)
    assert remote["module"].startswith("transformers_modules.")  # the copy shipped with the weights ran
    assert remote["classes"] == ["LlavaPluginForConditionalGeneration"] * 2
    assert torch.allclose(torch.tensor(remote["logits"]), logits, atol=1e-5)
    assert remote["tokens"] == tokens and len(tokens) == 16


def test_checkpoint_is_safetensors_only_with_code_processor_and_template(saved_checkpoint):
    names = {path.name for path in saved_checkpoint.iterdir()}
    assert "model.safetensors" in names and not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    assert {"configuration_llava_plugin.py", "modeling_llava_plugin.py", "processing_llava_plugin.py",
            "image_processing_llava_plugin.py", "vision_tower.py", "chat_template.jinja",
            "processor_config.json", "tokenizer.json"} <= names


def test_in_process_auto_classes_load_without_remote_code(saved_checkpoint, assembled, probe_image):
    model, processor = assembled
    loaded = AutoModel.from_pretrained(saved_checkpoint).eval()  # registered by `import llava_plugin`
    loaded_processor = AutoProcessor.from_pretrained(saved_checkpoint)
    assert type(loaded) is LlavaPluginForConditionalGeneration
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert in_process(loaded, loaded_processor, probe_image)[1] == in_process(model, processor, probe_image)[1]
