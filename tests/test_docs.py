"""The guides' commands run, so the docs cannot rot: every ```bash block marked `<!-- tested -->` in docs/*.md runs
here, in order, in a scratch folder, with the hub ids and data files of the full-size recipes swapped for tiny local
ones (and `--max-steps 2` for those recipes). `python app.py ...` lines start the app and chat with it."""

import os
import random
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from app_process import running_app

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MARK = "<!-- tested -->"


def marked_blocks(guide: Path) -> list[str]:
    lines, blocks = guide.read_text().splitlines(), []
    for index, line in enumerate(lines):
        if line.strip() == MARK and index + 1 < len(lines) and lines[index + 1].startswith("```bash"):
            end = lines.index("```", index + 2)
            blocks.append("\n".join(lines[index + 2:end]))
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv_of(command: str, swaps: dict[str, str]) -> tuple[dict, list[str]]:
    """(environment additions, argv) for one command, with the swaps applied and console scripts run as modules."""
    words = [swaps.get(word, word) for word in shlex.split(command)]
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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLAVA_MODEL", None)
    for block in marked_blocks(guide):
        for command in commands(block):
            extra, argv = argv_of(command, swaps)
            if argv[1:2] == ["app.py"]:
                model = argv[argv.index("--model") + 1] if "--model" in argv else "embedded"
                with running_app(argv[2:], tmp_path / "app.log", env={**env, **extra}, cwd=workdir) as (url, _):
                    chat_with(url, model, workdir)
                continue
            if full_size(argv):
                argv += ["--max-steps", "2", "--batch-size", "2"]
            result = subprocess.run(argv, cwd=workdir, env={**env, **extra}, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{guide.name}: `{command}` failed:\n{result.stderr[-3000:]}"
