"""How well the embedded shapes model answers as a chat goes on: accuracy of the 1st to 6th question about one image,
asked through the app's engine exactly as the app asks them (one session, the model's own earlier answers in the
prompt), for several sampling settings. Its table goes into the model card, and its best setting is the app's
default for this model.

python bench/followups_by_turn.py [--model checkpoints/shapes-llava] [--scenes 150] [--turns 6] [--json out.json]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import ChatEngine  # noqa: E402
from trainer.shapes.world import judge, questions, write_split  # noqa: E402

SETTINGS = {  # name: (temperature, top_p)
    "greedy": (0.0, 1.0),
    "T=0.2, top-p 0.7 (LLaVA's demo)": (0.2, 0.7),
    "T=0.7, top-p 0.9": (0.7, 0.9),
}


def chat(engine: ChatEngine, image: Path, asked: list[tuple], temperature: float, top_p: float, session: str) -> list[bool]:
    """Asks the questions one after another in one conversation; returns whether each answer was right."""
    messages, right = [], []
    for turn, (kind, question, expected) in enumerate(asked):
        content = [{"type": "image"}, {"type": "text", "text": question}] if turn == 0 else question
        messages.append({"role": "user", "content": content})
        answer = ""
        for answer in engine.stream(messages, str(image), temperature, top_p, 48, session_id=session):
            pass
        messages.append({"role": "assistant", "content": answer})
        right.append(judge(kind, answer, expected))
    return right


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "checkpoints" / "shapes-llava"))
    parser.add_argument("--scenes", type=int, default=150)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=2026, help="held-out scenes of this seed (training used others)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="followups-"))
    records = [json.loads(line) for line in write_split(folder, "followups", args.scenes, args.seed).read_text().splitlines()]
    engine = ChatEngine(args.model, device="cpu")
    results, started = {}, time.monotonic()
    for name, (temperature, top_p) in SETTINGS.items():
        by_turn = [[0, 0] for _ in range(args.turns)]
        for index, record in enumerate(records):
            rng = random.Random(f"{args.seed}:{index}")
            pool = questions(record["things"], rng)
            rng.shuffle(pool)
            asked = (pool * args.turns)[: args.turns]  # a scene with fewer questions asks some twice
            torch.manual_seed(index)
            for turn, ok in enumerate(chat(engine, folder / "images" / record["image"], asked, temperature, top_p,
                                           session=f"{name}:{index}")):
                by_turn[turn][0] += ok
                by_turn[turn][1] += 1
        results[name] = [right / total for right, total in by_turn]
        print(f"{name}: " + "  ".join(f"turn {turn + 1} {100 * value:.1f}%" for turn, value in enumerate(results[name])),
              flush=True)
    later = {name: sum(values[1:]) / (len(values) - 1) for name, values in results.items()}
    best = max(later, key=later.get)
    print(f"{args.scenes} scenes, {time.monotonic() - started:.0f} s; mean of turns 2-{args.turns}: "
          + ", ".join(f"{name} {100 * value:.1f}%" for name, value in later.items()) + f"; best: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps({"scenes": args.scenes, "by_turn": results, "mean_followups": later,
                                               "best": best, "settings": SETTINGS}, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # one chat at a time on a tiny model: more threads only add overhead
    sys.exit(main())
