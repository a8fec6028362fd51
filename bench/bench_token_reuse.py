"""Stage 2 on cached vision features: tokens rendered once and kept (llava-train's dataset) vs rendered from the chat
template at every read (the dataset before it kept them). Same run, same data, same model, same steps.

The model and data are the shapes world's (issue 5's pipeline): its tower and LM shapes with untrained weights, its
short questions with one follow-up per image, 48-token length buckets, batch 64, several epochs.

python bench/bench_token_reuse.py [--images 500] [--epochs 3]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.shapes.foundation import train_language_model, train_tower  # noqa: E402
from trainer.shapes.pipeline import SYSTEM_PROMPT, vqa_records  # noqa: E402
from trainer.shapes.world import write_split  # noqa: E402

# The baseline: the same trainer with the dataset's kept tokens bypassed, so every read renders the template again.
RENDER_EVERY_READ = """
import sys
import trainer.dataset
from trainer.data import encode

def render(self, index, record):
    encoded = encode(record, self.processor, self.seed, self.max_length, self.image_folder, load_pixels=False,
                     template=self.template, placement=self.placement)
    return encoded.input_ids, encoded.labels

trainer.dataset.LlavaDataset._tokens = render
from trainer.cli import main
sys.exit(main())
"""


def llava_train(args: list, baseline: bool) -> dict:
    command = [sys.executable, "-c", RENDER_EVERY_READ] if baseline else [sys.executable, "-m", "trainer.cli"]
    result = subprocess.run(command + [str(arg) for arg in args], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads((Path(args[args.index("--output") + 1]) / "train_metrics.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        write_split(folder / "world", "train", args.images, seed=0)
        train = [json.loads(line) for line in (folder / "world" / "train.jsonl").read_text().splitlines()]
        records = vqa_records(train, seed=0, follow_ups=1)
        (folder / "stage2.json").write_text(json.dumps(records))
        train_tower(folder / "tower", steps=1, scenes=4, batch_size=8, seed=0)
        texts = [SYSTEM_PROMPT] + [" ".join(turn["value"] for turn in record["conversations"]) for record in records]
        train_language_model(texts, folder / "llm", steps=1, batch_size=8, seed=0)
        common = ["--stage", 2, "--vision", f"open_clip:local-dir:{folder / 'tower'}", "--llm", folder / "llm",
                  "--projector", "mlp2x_gelu", "--system-prompt", SYSTEM_PROMPT, "--image-after-text",
                  "--data", folder / "stage2.json", "--image-folder", folder / "world" / "images", "--epochs", args.epochs,
                  "--batch-size", 64, "--length-bucket", 48, "--lr", 1e-3, "--save-every", 0, "--log-every", 10_000,
                  "--cache-vision-features", folder / "features"]
        llava_train(common + ["--output", folder / "warm"], baseline=False)  # builds the feature cache for both runs
        kept = llava_train(common + ["--output", folder / "kept"], baseline=False)
        rendered = llava_train(common + ["--output", folder / "rendered"], baseline=True)
    print(f"stage 2, {len(records)} samples x {args.epochs:g} epochs: tokens kept {kept['samples_per_s']:.1f} samples/s vs "
          f"rendered at every read {rendered['samples_per_s']:.1f}: ratio {kept['samples_per_s'] / rendered['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
