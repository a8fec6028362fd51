"""Assemble a self-contained Hugging Face Space (the app, the packages it imports, the examples and a model) and
upload it with huggingface_hub.

python -m spaces.deploy --space USER/NAME [--model PATH] [--out DIR] [--dry-run]

The model goes to `checkpoints/shapes-llava` inside the Space, the app's default, so the Space answers as soon as it starts.
"""

import argparse
import shutil
import sys
from pathlib import Path

import gradio

ROOT = Path(__file__).resolve().parent.parent
CODE = ("app.py", "engine", "llava_plugin", "trainer", "examples")
REQUIREMENTS = """\
torch>=2.4
transformers>=5.24,<5.25
accelerate>=1.10
peft>=0.17
open_clip_torch>=3.0,<4
huggingface_hub>=1.0
openai>=1.50
pillow>=10.0
safetensors>=0.4
tokenizers>=0.21
numpy>=1.26
pyyaml>=6.0
tqdm>=4.66
"""


def front_matter(space: str) -> str:
    title = space.split("/")[-1]
    return f"""---
title: {title}
emoji: 🖼️
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: {gradio.__version__}
app_file: app.py
pinned: false
license: apache-2.0
---

# {title}

Chat about an image with a LLaVA model trained by [llava-plugin](https://github.com/), and draft instruction data
from captions and boxes in the Data tab.
"""


def assemble(out: Path, model: Path, space: str) -> Path:
    if not (model / "config.json").is_file():
        raise ValueError(f"{model}: not a model folder (no config.json); pass --model with a llava_plugin checkpoint")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "datagen_cache")
    for name in CODE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=ignore)
        elif source.exists():
            shutil.copyfile(source, out / name)
    shutil.copytree(model, out / "checkpoints" / "shapes-llava", ignore=shutil.ignore_patterns("checkpoint-*", ".tmp-*"))
    (out / "requirements.txt").write_text(REQUIREMENTS)
    (out / "README.md").write_text(front_matter(space), encoding="utf-8")
    return out


def upload(out: Path, space: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(space, repo_type="space", space_sdk="gradio", exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=space, repo_type="space", commit_message="Deploy llava-plugin app")
    return f"https://huggingface.co/spaces/{space}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spaces.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="USER/NAME of the Space")
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-llava"), help="llava_plugin checkpoint to ship (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "build" / "space"), help="where to assemble (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="assemble only, upload nothing")
    args = parser.parse_args(argv)
    try:
        out = assemble(Path(args.out), Path(args.model), args.space)
    except (OSError, ValueError) as error:
        print(f"spaces.deploy: {error}", file=sys.stderr)
        return 2
    print(f"assembled {out}")
    if not args.dry_run:
        print(f"uploaded: {upload(out, args.space)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
