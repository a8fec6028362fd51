"""The shapes world (fixed; users and tests rely on it): white images with 1 to 3 non-overlapping filled shapes
(circle, square, triangle) in red, green, blue or yellow, each in one cell of a 3x3 grid, 15-30% of the image side,
jittered in size, position inside its cell and shade. Each image has captions in varied phrasing and pixel boxes
labelled "red circle", in the JSONL that llava-datagen reads; `questions` and `judge` are the held-out test."""

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 205, 20)}
GRID = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SIDES = (224, 256, 336, 384)  # image sizes drawn; every model input is resized anyway
KINDS = ("color", "shape", "count", "position", "yes/no", "describe")  # the question types, in report order


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    cell: int  # index into GRID
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels
    rgb: tuple[int, int, int]

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        return GRID[self.cell]


def make_scene(rng: random.Random, side: int) -> list[Thing]:
    """1-3 things in distinct cells; a thing never leaves its cell (at most 30% of the side, a cell is a third)."""
    cells = rng.sample(range(9), rng.randint(1, 3))
    things = []
    for cell in cells:
        size = int(side * rng.uniform(0.15, 0.30))
        cell_x, cell_y = (cell % 3) * side // 3, (cell // 3) * side // 3
        slack = side // 3 - size
        x, y = cell_x + rng.randint(0, max(slack, 0)), cell_y + rng.randint(0, max(slack, 0))
        color = rng.choice(list(COLORS))
        shade = tuple(min(255, max(0, channel + rng.randint(-25, 25))) for channel in COLORS[color])
        things.append(Thing(rng.choice(SHAPES), color, cell, (x, y, x + size, y + size), shade))
    return things


def render(things: list[Thing], side: int) -> Image.Image:
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    for thing in things:
        x1, y1, x2, y2 = thing.box
        if thing.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=thing.rgb)
        elif thing.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=thing.rgb)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=thing.rgb)
    return image


def swap_shapes(things: list[Thing], rng: random.Random) -> list[Thing]:
    """The same scene with at least one thing's shape changed (colour, cell and box kept): a hard negative that only
    the shapes tell apart, so contrastive training cannot match captions on colour and place alone."""
    out = list(things)
    changed = [rng.randrange(len(out))]
    if len(out) > 1 and rng.random() < 0.3:
        changed.append(rng.randrange(len(out)))
    for index, thing in enumerate(out):
        if index in changed:
            shape = rng.choice([s for s in SHAPES if s != thing.shape]) if index == changed[0] else rng.choice(SHAPES)
            out[index] = dataclasses.replace(thing, shape=shape)
    return out


def where(position: str) -> str:
    """A grid position as a caption or answer says it: "in the center", "at the top left"."""
    return "in the center" if position == "center" else f"at the {position}"


def reading_order(things: list[dict]) -> list[dict]:
    """Top left to bottom right (things as dicts: shape, color, position)."""
    return sorted(things, key=lambda thing: GRID.index(thing["position"]))


def naming_order(things: list[dict]) -> list[dict]:
    """By colour, then shape (the orders of COLORS and SHAPES). A model that reads the image tokens alike, as a bag,
    can list things in this order (the next colour present, then its shapes) but not in reading order, which needs
    the places: trained on reading-order descriptions it names one thing twice and leaves another out."""
    return sorted(things, key=lambda thing: (list(COLORS).index(thing["color"]), SHAPES.index(thing["shape"])))


def inventory(things: list[dict]) -> str:
    """Every thing with its colour and place, in reading order: "a red circle at the top left; a blue square in the
    center." (things as dicts: shape, color, position)."""
    return "; ".join(f"a {t['color']} {t['shape']} {where(t['position'])}" for t in reading_order(things)) + "."


def as_dicts(things: list[Thing]) -> list[dict]:
    return [{"shape": t.shape, "color": t.color, "position": t.position} for t in things]


def _listing(things: list[Thing]) -> str:
    names = [f"a {thing.label}" for thing in things]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def captions(things: list[Thing], rng: random.Random) -> list[str]:
    count = len(things)
    noun = "shape" if count == 1 else "shapes"
    placed = "; ".join(f"a {thing.label} {where(thing.position)}" for thing in things)
    options = [
        f"{_listing(things).capitalize()} on a white background.",
        f"A white picture with {NUMBER_WORDS[count]} {noun}: {_listing(things)}.",
        f"{placed.capitalize()}.",
        f"Simple drawing of {_listing(things)}.",
        f"{NUMBER_WORDS[count].capitalize()} colored {noun} on white: {placed}.",
    ]
    rng.shuffle(options)
    return options[:3]


def write_split(folder: Path, split: str, count: int, seed: int, sides=SIDES) -> Path:
    """Images under folder/images/<split>/ and folder/<split>.jsonl (llava-datagen's input format)."""
    rng = random.Random(f"{seed}:{split}")
    (folder / "images" / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        side = rng.choice(sides)
        things = make_scene(rng, side)
        name = f"{split}/{index:06d}.png"
        render(things, side).save(folder / "images" / name)
        lines.append(json.dumps({
            "id": f"{split}-{index:06d}", "image": name, "width": side, "height": side,
            "captions": captions(things, rng),
            "boxes": [{"label": thing.label, "bbox": list(thing.box)} for thing in things],
            "things": as_dicts(things),
        }))
    path = folder / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def questions(things: list[dict], rng: random.Random) -> list[tuple[str, str, object]]:
    """(kind, question, expected) in the canonical forms, for one image's things (dicts: shape, color, position)."""
    asked = []
    for thing in things:
        if sum(t["shape"] == thing["shape"] for t in things) == 1:
            asked.append(("color", f"What color is the {thing['shape']}?", thing["color"]))
        if sum(t["color"] == thing["color"] for t in things) == 1:
            asked.append(("shape", f"What shape is the {thing['color']} object?", thing["shape"]))
        if sum(t["color"] == thing["color"] and t["shape"] == thing["shape"] for t in things) == 1:
            asked.append(("position", f"Where is the {thing['color']} {thing['shape']}?", thing["position"]))
    asked.append(("count", "How many shapes are in the image?", len(things)))
    present = rng.choice(things)
    absent = next((f"{c} {s}" for c in rng.sample(list(COLORS), 4) for s in rng.sample(SHAPES, 3)
                   if not any(t["color"] == c and t["shape"] == s for t in things)))
    asked.append(("yes/no", f"Is there a {present['color']} {present['shape']} in the image?", "yes"))
    asked.append(("yes/no", f"Is there a {absent} in the image?", "no"))
    asked.append(("describe", "Describe the image.", [f"{t['color']} {t['shape']}" for t in things]))
    return asked


def named_position(answer: str) -> str | None:
    """The grid position an answer names: the longest match, "top left" rather than "top"."""
    text = " ".join(answer.lower().replace(",", " ").replace(".", " ").split())
    named = [position for position in sorted(GRID, key=len, reverse=True) if position in text]
    return named[0] if named else None


POSITION_OUTCOMES = ("right", "another thing's place", "an empty cell", "no place")


def position_outcome(answer: str, expected: str, things: list[dict]) -> str:
    """Why a "Where is ...?" answer is right or wrong (one of POSITION_OUTCOMES). "another thing's place" means the
    model read a place off the image but for the wrong thing (it did not bind the question's colour and shape to
    their image token); "an empty cell" means it did not read a place off the image at all."""
    named = named_position(answer)
    if named == expected:
        return "right"
    if named is None:
        return "no place"
    return "another thing's place" if any(thing["position"] == named for thing in things) else "an empty cell"


def judge(kind: str, answer: str, expected) -> bool:
    """Right when the answer contains the key word: the colour, shape, count (word or digit), grid position, yes/no,
    or for a description every shape with its colour. Other key words of the same kind must not appear as well."""
    text = " ".join(answer.lower().replace(",", " ").replace(".", " ").split())
    words = set(text.split())
    if kind == "color":
        return expected in words and not (words & set(COLORS)) - {expected}
    if kind == "shape":
        stems = {shape for shape in SHAPES if shape in words or shape + "s" in words}
        return stems == {expected}
    if kind == "count":
        said = {n for n, word in NUMBER_WORDS.items() if word in words or str(n) in words}
        return said == {expected}
    if kind == "position":
        return named_position(text) == expected
    if kind == "yes/no":
        said = {word for word in ("yes", "no") if word in words}
        return said == {expected}
    if kind == "describe":
        return all(label in text for label in expected)
    raise ValueError(f"unknown question kind {kind!r}")
