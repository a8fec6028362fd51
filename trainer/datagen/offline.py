"""A deterministic drafter with no LLM: counts, positions, sizes and relations read off the boxes, and the
captions paraphrased. It answers in the same format as the LLM backends, so the same parser checks both."""

import random
from collections import Counter

from .annotations import ImageAnnotation

GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def plural(label: str, count: int) -> str:
    if count == 1:
        return label
    head, _, last = label.rpartition(" ")
    if last == "person":
        last = "people"
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}".strip()


def number(count: int) -> str:
    return NUMBERS[count] if count < len(NUMBERS) else str(count)


def cell(box) -> str:
    """The 3x3 grid cell of a box's centre: 'top left' ... 'center' ... 'bottom right'."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return GRID[min(int(y * 3), 2)][min(int(x * 3), 2)]


def place(box) -> str:
    name = cell(box)
    return "in the center" if name == "center" else f"at the {name}"


def area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def inventory(counts: Counter) -> str:
    parts = [f"{number(count)} {plural(label, count)}" for label, count in counts.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def conversation_turns(annotation: ImageAnnotation, rng: random.Random) -> list[tuple[str, str]]:
    boxes = annotation.normalized_boxes()
    counts = Counter(label for label, _ in boxes)
    singles = [(label, box) for label, box in boxes if counts[label] == 1]
    candidates = []
    if boxes:
        candidates.append(("What objects can you see in the image?", f"I can see {inventory(counts)}."))
        for label, count in counts.items():
            verb = "is" if count == 1 else "are"
            candidates.append((f"How many {plural(label, 2)} are in the image?", f"There {verb} {number(count)} {plural(label, count)}."))
        for label, box in singles:
            candidates.append((f"Where is the {label}?", f"The {label} is {place(box)} of the image."))
        for (first, first_box), (second, second_box) in zip(singles, singles[1:]):
            left = (first_box[0] + first_box[2]) < (second_box[0] + second_box[2])
            answer = f"Yes, the {first} is to the left of the {second}." if left else f"No, the {first} is to the right of the {second}."
            candidates.append((f"Is the {first} to the left of the {second}?", answer))
        if len(singles) >= 2:
            largest = max(singles, key=lambda item: area(item[1]))[0]
            candidates.append(("Which object looks the largest?", f"The {largest} is the largest object in the image."))
    for caption in annotation.captions[:1]:
        candidates.append(("What is happening in the image?", sentence(caption)))
    rng.shuffle(candidates)
    return candidates[: rng.randint(min(3, len(candidates)), min(5, len(candidates)))]


def description(annotation: ImageAnnotation, rng: random.Random) -> str:
    boxes = annotation.normalized_boxes()
    counts = Counter(label for label, _ in boxes)
    parts = [sentence(annotation.captions[0])] if annotation.captions else []
    if boxes:
        verb = "is" if len(boxes) == 1 else "are"
        parts.append(f"In the image there {verb} {inventory(counts)}.")
        ordered = sorted(boxes, key=lambda item: -area(item[1]))
        for index, (label, box) in enumerate(ordered):
            size = "large" if area(box) > 0.2 else "small" if area(box) < 0.03 else "medium-sized"
            lead = "The biggest is" if index == 0 and len(ordered) > 1 else "There is"
            parts.append(f"{lead} a {size} {label} {place(box)}.")
    extra = list(annotation.captions[1:])
    rng.shuffle(extra)
    parts += [sentence(caption) for caption in extra[:2]]
    return " ".join(parts)


def complex_turn(annotation: ImageAnnotation, rng: random.Random) -> tuple[str, str]:
    boxes = sorted(annotation.normalized_boxes(), key=lambda item: -area(item[1]))
    if len(boxes) >= 2:
        (big, big_box), (small, small_box) = boxes[0], boxes[-1]
        question = rng.choice((
            f"If you wanted to point someone to the {small}, how would you use the {big} to describe where it is?",
            f"How are the {big} and the {small} arranged in this scene, and what does that tell you about it?",
        ))
        answer = (
            f"First, the {big} is the largest object, {place(big_box)} of the image, so it is the easiest thing to "
            f"notice. Second, the {small} is {place(small_box)}. Therefore the {small} can be found by looking "
            f"{'left' if small_box[0] < big_box[0] else 'right'} of the {big}"
            f"{' and ' + ('higher' if small_box[1] < big_box[1] else 'lower') if abs(small_box[1] - big_box[1]) > 0.1 else ''}"
            f", using the {big} as a landmark."
        )
        return question, answer
    if boxes:
        label, box = boxes[0]
        return (f"What stands out about the {label} in this image, and why?",
                f"The {label} is the only object, {place(box)} of the image. Since nothing else competes with it, "
                f"it is clearly the subject of the picture, and the rest of the frame is background.")
    caption = annotation.captions[0]
    return ("What can you infer about this scene?",
            f"{sentence(caption)} From this, the scene is most likely exactly what it appears to be: the main "
            f"subject is described first, so it is the focus of the picture.")


def format_turns(turns: list[tuple[str, str]]) -> str:
    return "\n===\n".join(f"Question:\n{question}\n===\nAnswer:\n{answer}" for question, answer in turns)


def draft_offline(annotation: ImageAnnotation, kind: str, rng: random.Random) -> str:
    """The response text an LLM would have written, for one kind."""
    if kind == "conversation":
        return format_turns(conversation_turns(annotation, rng))
    if kind == "detail":
        return description(annotation, rng)
    return format_turns([complex_turn(annotation, rng)])
