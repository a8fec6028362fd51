"""The guides' commands run, so the docs cannot rot: every ```bash (or ```python) block marked `<!-- tested -->` in
docs/*.md runs here, in order, in a scratch folder, with the hub ids, data files and local servers of the full-size
recipes swapped for tiny local ones (and `--max-steps 2` for those recipes). `python app.py ...` lines start the app
and chat with it; a python block runs as a script, the same swaps made in its text."""

import functools
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from app_process import running_app
from fake_openai import FakeOpenAI
from gradio_client import Client, handle_file
from tiny_components import save_llava_hf, save_llava_next_hf, save_original_llava

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MARK = "<!-- tested -->"


def marked_blocks(guide: Path) -> list[tuple[str, str]]:
    """(language, text) of each marked block, in order."""
    lines, blocks = guide.read_text().splitlines(), []
    for index, line in enumerate(lines):
        fence = lines[index + 1] if index + 1 < len(lines) else ""
        if line.strip() == MARK and fence in ("```bash", "```python"):
            end = lines.index("```", index + 2)
            blocks.append((fence[3:], "\n".join(lines[index + 2:end])))
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv_of(command: str, swaps: dict[str, str]) -> tuple[dict, list[str]]:
    """(environment additions, argv) for one command, with the swaps applied and console scripts run as modules."""
    words = [swaps.get(word, word) for word in shlex.split(command, comments=True)]
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    program, rest = words[0], words[1:]
    if program == "python":
        return env, [sys.executable, *rest]
    if program == "accelerate":
        return env, [sys.executable, "-m", "accelerate.commands.launch", *rest[1:]]
    module, function = SCRIPTS[program].split(":")
    return env, [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())", *rest]


def full_size(argv: list[str]) -> bool:
    return any(word.startswith("--preset") for word in argv) or "accelerate.commands.launch" in argv


def orange_pictures(count: int, folder: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT / "examples"))
    from make_orange_data import orange_scene

    from trainer.shapes.world import render

    rng, paths = random.Random(99), []
    for index in range(count):
        things = orange_scene(rng, 224)
        if sum(thing.shape == things[0].shape for thing in things) == 1:  # "the circle" names one thing
            paths.append(folder / f"ask_{index}_{things[0].shape}.png")
            render(things, 224).save(paths[-1])
    return paths


def chat_with(url: str, model: str, workdir: Path) -> None:
    """What the guide promises of the model the app serves."""
    client = Client(url, verbose=False)
    if "orange" in model:
        pictures = orange_pictures(12, workdir)
        said = [client.predict({"text": f"What color is the {path.stem.split('_')[-1]}?", "files": [handle_file(str(path))]},
                               0.0, 1.0, 16, api_name="/chat") for path in pictures]
        assert sum("orange" in answer for answer in said) >= 0.6 * len(said), said
        known = client.predict({"text": "What color is the circle?",
                                "files": [handle_file(str(ROOT / "examples" / "red_circle_blue_square.png"))]}, 0.0, 1.0, 16,
                               api_name="/chat")
        assert "red" in known, known
    else:
        answer = client.predict({"text": "What is it?", "files": [handle_file(str(ROOT / "examples" / "three_shapes.png"))]},
                                0.0, 1.0, 8, api_name="/chat")
        assert answer and not answer.startswith(("Please", "Sorry")), answer


def tiny_data(folder: Path):
    """Stand-ins, in the released schemas, for the full-size recipes' data files."""
    import json

    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions, chats = [], []
    for index in range(6):
        name = f"{index}.png"
        Image.new("RGB", (40 + 4 * index, 36), (40 * index, 90, 200 - 30 * index)).save(folder / "images" / name)
        captions.append({"id": f"{index:09d}", "image": name, "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": f"a square of colour number {index}"}]})
        chats.append({"id": f"{index:09d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "A coloured square."},
            {"from": "human", "value": "Is it bright?"}, {"from": "gpt", "value": "Yes, fairly bright."}]})
    (folder / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(captions))
    (folder / "llava_v1_5_mix665k.json").write_text(json.dumps(chats))
    datagen_inputs(folder)
    (folder / "my_questions.jsonl").write_text(shown_file(ROOT / "docs" / "eval.md", "my_questions.jsonl"))


def shown_file(guide: Path, name: str) -> str:
    """The ```json block that follows the guide's first mention of `name`: the file its commands read."""
    text = guide.read_text()
    start = text.index("```json\n", text.index(f"`{name}`")) + len("```json\n")
    return text[start:text.index("```", start)]


def datagen_inputs(folder: Path):
    """Stand-ins for llava-datagen's inputs: our JSONL, the original's caps_boxes records, COCO's two files, and a
    prompt folder in the original's layout (our own text, in the phrasing tests/fake_openai.py answers)."""
    import json

    things = [("cat", [10, 20, 60, 90]), ("sofa", [0, 40, 100, 100])]
    rows = [{"id": f"im{index}", "image": f"{index}.png", "width": 100, "height": 100,
             "captions": [f"A cat on a sofa, picture {index}.", "A pet resting indoors."],
             "boxes": [{"label": label, "bbox": box} for label, box in things]} for index in range(3)]
    (folder / "annotations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    caps_boxes = [{"id": row["id"], "image": row["image"], "captions": row["captions"],
                   "instances": [{"category": label, "bbox": [v / 100 for v in box]} for label, box in things]} for row in rows]
    (folder / "caps_boxes_coco2014_val_80.jsonl").write_text("".join(json.dumps(row) + "\n" for row in caps_boxes))
    images = [{"id": index, "file_name": f"{index:012d}.jpg", "width": 100, "height": 100} for index in range(3)]
    (folder / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": index, "image_id": index, "caption": f"A cat on a sofa, picture {index}."} for index in range(3)]}))
    (folder / "instances_train2017.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "couch"}],
        "annotations": [{"id": 10 * index + c, "image_id": index, "category_id": c, "bbox": [10, 20, 50, 70]}
                        for index in range(3) for c in (1, 2)]}))
    systems = {"conversation": "Write a conversation about the image.", "detail_description": "Describe the image in rich detail.",
               "complex_reasoning": "Ask and answer one question that needs reasoning."}
    for name, system in systems.items():
        kind = Path(folder / "LLaVA/playground/data/prompts" / name)
        kind.mkdir(parents=True)
        (kind / "system_message.txt").write_text(system)
        (kind / "000_caps.txt").write_text("A dog on a lawn.")
        (kind / "000_conv.txt").write_text("Question:\nWhat animal is it?\n===\nAnswer:\nA dog.")


def interop_checkpoints(folder: Path, clip: str) -> dict[str, str]:
    """Tiny stand-ins for the hub checkpoints the conversion guide names, in their own layouts."""
    made = {"llava-hf/llava-1.5-7b-hf": save_llava_hf(folder / "llava-hf", clip),
            "llava-hf/llava-v1.6-mistral-7b-hf": save_llava_next_hf(folder / "llava-next-hf", clip, [[32, 64], [64, 32], [64, 64]])}
    for name, extra in (("liuhaotian/llava-v1.5-7b", {}),
                        ("liuhaotian/llava-v1.6-vicuna-7b", {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                                                              "image_grid_pinpoints": "[(32, 64), (64, 64)]"})):
        made[name] = folder / name.split("/")[1]
        made[name].mkdir(parents=True)
        newline = {"model.image_newline": torch.randn(32)} if extra else None
        save_original_llava(made[name], seed=3, max_position_embeddings=512, extra_weights=newline, mm_vision_tower=clip, **extra)
    return {name: str(path) for name, path in made.items()}


GUIDES = sorted(guide for guide in (ROOT / "docs").rglob("*.md") if marked_blocks(guide))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("guide", GUIDES, ids=[guide.name for guide in GUIDES])
def test_the_guides_commands_run(guide, parts, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    for name in ("checkpoints", "examples", "app.py"):
        (workdir / name).symlink_to(ROOT / name)
    tiny_data(workdir)
    swaps = {"openai/clip-vit-large-patch14-336": parts["clip"], "lmsys/vicuna-7b-v1.5": parts["llm"]}
    if "liuhaotian/" in guide.read_text() or "llava-hf/" in guide.read_text():
        swaps |= interop_checkpoints(tmp_path / "hub", parts["clip"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLAVA_PLUGIN_CACHE": str(tmp_path / "cache")}
    env.pop("LLAVA_MODEL", None)
    with FakeOpenAI() as server:  # what a local vLLM or Ollama server is in the guides
        swaps |= {"http://localhost:8000/v1": server.base_url, "http://localhost:11434/v1": server.base_url}
        for number, (language, block) in enumerate(marked_blocks(guide)):
            if language == "python":
                script = workdir / f"block_{number}.py"
                script.write_text(functools.reduce(lambda text, swap: text.replace(*swap), swaps.items(), block))
                result = subprocess.run([sys.executable, script.name], cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
                assert result.returncode == 0, f"{guide.name}: python block {number} failed:\n{result.stderr[-3000:]}"
                continue
            for command in commands(block):
                run_command(command, guide, swaps, env, workdir, tmp_path)


def run_command(command: str, guide: Path, swaps: dict, env: dict, workdir: Path, tmp_path: Path):
    extra, argv = argv_of(command, swaps)
    if argv[1:2] == ["app.py"]:
        model = argv[argv.index("--model") + 1] if "--model" in argv else "embedded"
        with running_app(argv[2:], tmp_path / "app.log", env={**env, **extra}, cwd=workdir) as (url, _):
            chat_with(url, model, workdir)
        return
    if full_size(argv):
        argv += ["--max-steps", "2", "--batch-size", "2"]
    result = subprocess.run(argv, cwd=workdir, env={**env, **extra}, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{guide.name}: `{command}` failed:\n{result.stderr[-3000:]}"
