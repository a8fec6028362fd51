"""Makes a small data set for the walk-through "fine-tune the demo model on your own images" (docs/training.md):
pictures with orange shapes, a colour the demo model has never seen, and as many pictures of the world it knows (so
that it learns the new colour without forgetting the others), with the world's questions and answers as LLaVA JSON.

python examples/make_orange_data.py OUT [--scenes 16]      (writes OUT/data.json and OUT/*.png)
"""

import argparse
import json
import random
from pathlib import Path

from trainer.shapes.pipeline import vqa_records
from trainer.shapes.world import SHAPES, Thing, as_dicts, make_scene, reading_order, render

ORANGE = (245, 140, 20)


def orange_scene(rng: random.Random, side: int) -> list[Thing]:
    """The world's scene with its first thing turned orange."""
    first, *others = make_scene(rng, side)
    return [Thing(rng.choice(SHAPES), "orange", first.cell, first.box, ORANGE), *others]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--scenes", type=int, default=24, help="orange scenes (default: %(default)s)")
    parser.add_argument("--known", type=int, default=8, help="scenes of the known colours, against forgetting (default: %(default)s)")
    args = parser.parse_args(argv)
    rng, scenes = random.Random(0), []
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(args.scenes + args.known):
        things = orange_scene(rng, 224) if index < args.scenes else make_scene(rng, 224)
        name = f"scene_{index:03d}.png"
        render(things, 224).save(args.out / name)
        scenes.append({"id": f"scene-{index:03d}", "image": name, "things": as_dicts(things)})
    records = vqa_records(scenes, seed=0, order=reading_order)  # naming order knows only the four colours
    (args.out / "data.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"{len(records)} questions about {len(scenes)} pictures in {args.out / 'data.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
