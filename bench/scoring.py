"""Prompts scored through llava-serve as lm-eval's multiple-choice tasks score them (/v1/completions with
`logprobs: 1`, `echo: true`, `max_tokens: 1`, prompts as token ids, `batch_size` of them per request): the
scheduler's scoring prompts together in one forward against one forward per prompt (the baseline, as the first
version did it), in the same run, on the same server.

python bench/scoring.py [--prompts 128] [--batch-sizes 1 8 32] [--threads 1] [--repeats 3]

Prints, per batch size, the prompts scored per second each way and their ratio. The engine runs in this process
(--single-process's layout), on the embedded shapes model."""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402
import torch  # noqa: E402

from engine import ChatEngine, scheduler  # noqa: E402
from engine.server import create_app, running  # noqa: E402

QUESTIONS = ["What color is the circle?", "How many shapes are in the image?", "Where is the red square?",
             "Which shape is the largest?"]
CHOICES = ["red", "green", "blue", "yellow", "one", "two", "three", "top left", "center", "bottom right"]


def prompts(tokenizer, count: int) -> list[list[int]]:
    """Context + continuation token ids, as lm-eval sends them: each question with each choice."""
    made = []
    for index in range(count):
        question, choice = QUESTIONS[index % len(QUESTIONS)], CHOICES[index % len(CHOICES)]
        context = tokenizer(f"Question {index}: {question}\nAnswer:")["input_ids"]
        made.append(context + tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
    return made


def scored_per_second(base_url: str, model: str, batches: list[list[list[int]]]) -> float:
    start = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for batch in batches:
            response = client.post(f"{base_url}/completions", json={"model": model, "prompt": batch, "temperature": 0,
                                                                    "max_tokens": 1, "logprobs": 1, "echo": True})
            response.raise_for_status()
            assert len(response.json()["choices"]) == len(batch)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = ChatEngine(str(ROOT / "checkpoints" / "shapes-llava"), device="cpu")
    made = prompts(engine.processor.tokenizer, args.prompts)
    print(f"{args.prompts} prompts of {min(map(len, made))}-{max(map(len, made))} tokens, torch threads {args.threads}")
    together = scheduler.SCORED_LOGITS
    # room for the longest prompt's logits, and no more: each prompt in a forward of its own, none split in parts
    one_each = max(map(len, made)) * engine.scheduler.vocabulary
    with running(create_app(engine, "shapes", max_concurrent=64)) as base_url:
        for size in args.batch_sizes:
            batches = [made[start: start + size] for start in range(0, len(made), size)]
            rates = {}
            for name, logits in (("one per forward", one_each), ("together", together)):
                scheduler.SCORED_LOGITS = logits  # read at each scoring
                scored_per_second(base_url, "shapes", batches[:2])  # warm
                rates[name] = max(scored_per_second(base_url, "shapes", batches) for _ in range(args.repeats))
            scheduler.SCORED_LOGITS = together
            print(f"batch_size {size:3d}: one per forward {rates['one per forward']:7.1f} prompts/s, together "
                  f"{rates['together']:7.1f} prompts/s, {rates['together'] / rates['one per forward']:.2f}x")


if __name__ == "__main__":
    main()
