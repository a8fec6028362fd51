"""Turns -> a LLaVA JSON record, with the image marker before or after the first question (seeded)."""

import random

from .annotations import ImageAnnotation
from .prompts import DETAIL_INSTRUCTIONS


def job_random(seed: int, image_id: str, kind: str, purpose: str) -> random.Random:
    """A random stream per (image, kind, purpose): results do not depend on concurrency, order or retries."""
    return random.Random(f"{seed}:{image_id}:{kind}:{purpose}")


def record_id(image_id: str, kind: str) -> str:
    return f"{image_id}_{kind}"


def to_record(annotation: ImageAnnotation, kind: str, turns: list[tuple[str | None, str]], seed: int) -> dict:
    rng = job_random(seed, annotation.id, kind, "record")
    conversations = []
    for index, (question, answer) in enumerate(turns):
        if question is None:  # detailed description: the instruction is ours, drawn from the list
            question = rng.choice(DETAIL_INSTRUCTIONS)
        if index == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": record_id(annotation.id, kind), "image": annotation.image, "conversations": conversations}
