"""llava-shapes: the whole LLaVA pipeline in miniature, each step with the project's real code.

1. the world: train and held-out splits; 2. foundation: a CLIP-style tower (open_clip) and a small LM;
3. stage 1 (`llava-train`); 4. instruction data (`llava-datagen --backend offline`) plus the world's short-answer
questions (as LLaVA-1.5 mixes in VQA data); 5. stage 2 (`llava-train`); 6. evaluation on held-out images.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from .foundation import train_language_model, train_tower
from .world import NUMBER_WORDS, judge, questions, write_split

KINDS = ("color", "shape", "count", "position", "yes/no", "describe")


def spoken(kind: str, question: str, expected) -> str:
    """A full-sentence answer that holds the key word."""
    if kind == "count":
        return "There is one shape in the image." if expected == 1 else f"There are {NUMBER_WORDS[expected]} shapes in the image."
    if kind == "yes/no":
        thing = question[len("Is there a "):-len(" in the image?")]
        return f"Yes, there is a {thing} in the image." if expected == "yes" else f"No, there is no {thing} in the image."
    if kind == "color":
        return f"The {question.split()[-1].rstrip('?')} is {expected}."
    if kind == "shape":  # "What shape is the {color} object?"
        return f"The {question.split()[4]} object is a {expected}."
    if kind == "position":  # "Where is the {color} {shape}?"
        where = "in the center" if expected == "center" else f"at the {expected}"
        return f"The {' '.join(question.split()[3:]).rstrip('?')} is {where} of the image."
    return "The image shows " + " and ".join(f"a {label}" for label in expected) + "."


def vqa_records(records: list[dict], seed: int) -> list[dict]:
    rng, out = random.Random(seed), []
    for record in records:
        asked = questions(record["things"], rng)
        rng.shuffle(asked)
        turns = []
        for kind, question, expected in asked:
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": spoken(kind, question, expected)}]
        out.append({"id": f"{record['id']}_vqa", "image": record["image"], "conversations": turns})
    return out


def run_command(*args):
    result = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(map(str, args[:2]))} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def evaluate(model_path: Path, records: list[dict], image_folder: Path, seed: int) -> dict:
    from transformers import AutoModel, AutoProcessor

    import llava_plugin  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    rng, scores, samples = random.Random(seed), {kind: [0, 0] for kind in KINDS}, []
    for record in records:
        image = Image.open(image_folder / record["image"]).convert("RGB")
        for kind, question, expected in questions(record["things"], rng):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=32, do_sample=False)
            answer = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            right = judge(kind, answer, expected)
            scores[kind][0] += right
            scores[kind][1] += 1
            if len(samples) < 12:
                samples.append({"kind": kind, "question": question, "answer": answer, "right": right})
    return {"accuracy": {kind: right / total if total else 0.0 for kind, (right, total) in scores.items()},
            "counts": {kind: total for kind, (_, total) in scores.items()}, "samples": samples}


def run(out: Path, train_images: int, test_images: int, seed: int, tower_epochs: int, lm_steps: int, stage1_epochs: float,
        stage2_epochs: float, batch_size: int) -> dict:
    started, timings = time.perf_counter(), {}
    world = out / "world"
    train_path, test_path = write_split(world, "train", train_images, seed), write_split(world, "test", test_images, seed)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    test = [json.loads(line) for line in test_path.read_text().splitlines()]
    timings["world"] = time.perf_counter() - started

    instruct = out / "instruct.json"
    run_command("trainer.datagen.cli", "--input", train_path, "--output", instruct, "--backend", "offline", "--seed", seed)
    drafted = json.loads(instruct.read_text())
    vqa = vqa_records(train, seed)
    texts = [caption for record in train for caption in record["captions"]]
    texts += [" ".join(turn["value"].replace("<image>", "").strip() for turn in record["conversations"]) for record in drafted + vqa]
    tower = train_tower(train, world / "images", out / "tower", tower_epochs, min(batch_size * 4, 256), seed)
    timings["tower"] = time.perf_counter() - started - sum(timings.values())
    llm = train_language_model(texts, out / "llm", lm_steps, batch_size, seed)
    timings["language model"] = time.perf_counter() - started - sum(timings.values())

    captions = [{"id": f"{r['id']}_caption{i}", "image": r["image"], "caption": c} for r in train for i, c in enumerate(r["captions"][:1])]
    (out / "captions.json").write_text(json.dumps(captions))
    common = ["--image-folder", world / "images", "--batch-size", batch_size, "--save-every", 0, "--seed", seed, "--log-every", 50]
    run_command("trainer.cli", "--stage", 1, "--vision", f"open_clip:local-dir:{tower}", "--llm", llm, "--projector", "mlp2x_gelu",
                "--data", out / "captions.json", "--output", out / "stage1", "--lr", 1e-3, "--epochs", stage1_epochs, *common)
    timings["stage 1"] = time.perf_counter() - started - sum(timings.values())
    (out / "stage2.json").write_text(json.dumps(drafted + vqa))
    run_command("trainer.cli", "--stage", 2, "--model", out / "stage1", "--data", out / "stage2.json", "--output", out / "stage2",
                "--lr", 5e-4, "--projector-lr", 5e-4, "--epochs", stage2_epochs, *common)
    timings["stage 2"] = time.perf_counter() - started - sum(timings.values())
    result = evaluate(out / "stage2", test, world / "images", seed)
    timings["evaluation"] = time.perf_counter() - started - sum(timings.values())
    result["timings"] = {step: round(seconds, 1) for step, seconds in timings.items()}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llava-shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/shapes", help="working folder (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower-epochs", type=int, default=10)
    parser.add_argument("--lm-steps", type=int, default=1500)
    parser.add_argument("--stage1-epochs", type=float, default=1.0)
    parser.add_argument("--stage2-epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    result = run(Path(args.output), args.train_images, args.test_images, args.seed, args.tower_epochs, args.lm_steps,
                 args.stage1_epochs, args.stage2_epochs, args.batch_size)
    print(json.dumps({"accuracy": result["accuracy"], "timings": result["timings"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
