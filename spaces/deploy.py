"""Assemble a self-contained Hugging Face Space (the app, the packages it imports, the examples and a model) and
upload it with huggingface_hub.

python -m spaces.deploy --dry-run [--model PATH] [--out DIR]        # assemble only (default out: build/space)
python -m spaces.deploy --space USER/NAME [--model PATH]            # assemble and upload (needs HF_TOKEN or a login)

The model goes to `checkpoints/shapes-llava` inside the Space, the app's default, so the Space answers as soon as it
starts. Spaces start `python app.py` with GRADIO_SERVER_NAME=0.0.0.0 and GRADIO_SERVER_PORT=7860, which the app
honours. The requirements take torch's CPU build (a free Space has no GPU; the default CUDA build is ~3 GB more).
"""

import argparse
import shutil
import sys
from pathlib import Path

import gradio

ROOT = Path(__file__).resolve().parent.parent
CODE = ("app.py", "engine", "llava_plugin", "trainer", "examples")
REQUIREMENTS = """\
# torch's CPU wheels: pip prefers the +cpu build of the same release, without the CUDA libraries.
--extra-index-url https://download.pytorch.org/whl/cpu
torch>=2.4
torchvision
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


def front_matter(space: str, source_url: str | None = None) -> str:
    title = space.split("/")[-1]
    made_with = f"[llava-plugin]({source_url})" if source_url else "llava-plugin"
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

Chat about an image with a LLaVA model made with {made_with}, and draft instruction data from captions and boxes
in the Data tab. The Data tab drafts offline; its remote backend stays off unless the app is started with
`--remote-drafting` (see the app's `--help`).
"""


def assemble(out: Path, model: Path, space: str, source_url: str | None = None) -> Path:
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
    (out / "README.md").write_text(front_matter(space, source_url), encoding="utf-8")
    return out


def upload(out: Path, space: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(space, repo_type="space", space_sdk="gradio", exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=space, repo_type="space", commit_message="Deploy llava-plugin app")
    return f"https://huggingface.co/spaces/{space}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spaces.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--space", help="USER/NAME of the Space (needed to upload; the title with --dry-run)")
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-llava"), help="llava_plugin checkpoint to ship (default: %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "build" / "space"), help="where to assemble (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="assemble only, upload nothing")
    parser.add_argument("--source-url", help="link the Space's README to this page of the project")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.space:
        parser.error("--space USER/NAME is needed to upload (or pass --dry-run to assemble only)")
    try:
        out = assemble(Path(args.out), Path(args.model), args.space or "llava-plugin-demo", args.source_url)
    except (OSError, ValueError) as error:
        print(f"spaces.deploy: {error}", file=sys.stderr)
        return 2
    print(f"assembled {out}")
    if not args.dry_run:
        print(f"uploaded: {upload(out, args.space)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
