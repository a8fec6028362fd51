"""Training data: LLaVA JSON/JSONL records -> chat messages -> token ids, labels (answers only) and images.

A record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}...]}`, or an image-caption pair
`{"id", "image", "caption"}` that becomes one turn with a brief-description question (stage 1). Labels come from
the chat template's `{% generation %}` marks, the same template inference uses, so the two cannot drift.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateError
from PIL import Image

from llava_plugin import ImageLoadError, load_image

BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"


class DataError(ValueError):
    """A record that cannot be trained on; the message names the file and record."""


@dataclass(frozen=True)
class Record:
    id: str
    image: str | None
    conversations: tuple[tuple[str, str], ...]  # (role, text) with roles user/assistant/system
    source: str  # "file.json#12" for messages


def load_records(paths: list[str], seed: int) -> list[Record]:
    records, seen = [], {}
    for path in paths:
        for index, raw in enumerate(_read(Path(path))):
            where = f"{path}#{index}"
            record = parse_record(raw, where, seed)
            if record.id in seen:
                raise DataError(f"{where}: id {record.id!r} already used at {seen[record.id]}")
            seen[record.id] = where
            records.append(record)
    return records


def _read(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from error
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


def parse_record(raw: dict, where: str, seed: int) -> Record:
    if not isinstance(raw, dict) or "id" not in raw:
        raise DataError(f"{where}: a record needs an 'id'")
    rid, image = str(raw["id"]), raw.get("image")
    if "conversations" not in raw:
        if "caption" not in raw or not image:
            raise DataError(f"{where} ({rid}): needs 'conversations', or 'image' and 'caption'")
        question = random.Random(f"{seed}:{rid}:instruction").choice(BRIEF_INSTRUCTIONS)
        raw = {**raw, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": raw["caption"]}]}
    turns = []
    for number, turn in enumerate(raw["conversations"]):
        role = ROLES.get(turn.get("from") if isinstance(turn, dict) else None)
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"{where} ({rid}): turn {number} needs 'from' (human/gpt) and a string 'value', got {turn!r}")
        turns.append((role, turn["value"]))
    return Record(rid, str(image) if image else None, tuple(turns), where)


def to_messages(record: Record, seed: int) -> list[dict]:
    """Chat-template messages. The image goes into the first user turn, before or after the question at random
    (seeded by record), unless the text already places `<image>`; roles must alternate after an optional system."""
    turns = list(record.conversations)
    if record.image and not any(IMAGE_MARKER in text for _, text in turns):
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise DataError(f"{record.source} ({record.id}): has an image but no user turn to hold it")
        before = random.Random(f"{seed}:{record.id}:image").random() < 0.5
        role, text = turns[first_user]
        turns[first_user] = (role, f"{IMAGE_MARKER}\n{text}" if before else f"{text}\n{IMAGE_MARKER}")
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if markers != (1 if record.image else 0):
        raise DataError(f"{record.source} ({record.id}): {markers} <image> markers for {1 if record.image else 0} images")
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{record.source} ({record.id}): no assistant turn, nothing to learn")
    roles = [role for role, _ in turns if role != "system"]
    if any(role != ("user" if index % 2 == 0 else "assistant") for index, role in enumerate(roles)) or \
            any(role == "system" for role, _ in turns[1:]):
        raise DataError(f"{record.source} ({record.id}): turns must alternate human/gpt, starting with human "
                        f"(an optional system turn first), got {[role for role, _ in turns]}")
    messages = []
    for role, text in turns:
        parts = text.split(IMAGE_MARKER)
        if len(parts) == 1:
            messages.append({"role": role, "content": text})
            continue
        # The template joins parts with "\\n", so the text beside the marker loses the newline it had.
        content = [{"type": "text", "text": part.strip("\n")} for part in parts]
        content.insert(1, {"type": "image"})
        messages.append({"role": role, "content": [part for part in content if part.get("type") == "image" or part["text"]]})
    return messages


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,) -100 outside the answers
    pixel_values: torch.Tensor | None  # (1, 3, H, W); AnyRes: (tiles, 3, H, W)
    image_sizes: torch.Tensor | None = None  # AnyRes only: (images, 2) original height, width


# Stands in for the image when only the token layout is needed (cached vision features): the processor expands
# <image> the same way whatever the picture.
_PLACEHOLDER = Image.new("RGB", (1, 1))


def encode(record: Record, processor, seed: int, max_length: int, image_folder: str, load_pixels: bool = True) -> Encoded:
    """Raises DataError (bad record or too long) or ImageLoadError (unreadable image)."""
    messages = to_messages(record, seed)
    image = None
    if record.image:
        image = load_image(Path(image_folder) / record.image) if load_pixels else _PLACEHOLDER
        for message in messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image":
                    part["image"] = image
    try:
        out = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
    except (ValueError, TemplateError) as error:  # over the model's context, markers or turns the template refuses
        raise DataError(f"{record.source} ({record.id}): {error}") from error
    input_ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    if len(input_ids) > max_length:
        raise DataError(f"{record.source} ({record.id}): {len(input_ids)} tokens, over --max-length {max_length}")
    if not mask.any():
        raise DataError(f"{record.source} ({record.id}): the answers tokenized to nothing")
    labels = input_ids.masked_fill(~mask, -100)
    pixels = image is not None and load_pixels
    return Encoded(input_ids, labels, out["pixel_values"] if pixels else None, out.get("image_sizes") if pixels else None)


__all__ = ["BRIEF_INSTRUCTIONS", "DataError", "Encoded", "ImageLoadError", "Record", "encode", "load_records", "parse_record", "to_messages"]
