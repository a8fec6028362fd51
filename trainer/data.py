"""Training data: one LLaVA record -> chat messages -> token ids, labels (answers only) and images.

A record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}...]}`, or an image-caption pair
`{"id", "image", "caption"}` that becomes one turn with a brief-description question (stage 1). `image` is a path,
embedded image bytes (a Hugging Face `Image` feature), or a list of them. Ids need not be unique (the original
data's ids are image ids, shared by the records of one image): a record is known by its position, `source`.
Labels come from the chat template's `{% generation %}` marks, the same template inference uses, so the two cannot
drift. Where records come from (files, `datasets`) is `sources.py`.
"""

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2 import TemplateError
from PIL import Image

from llava_plugin import ImageLoadError, load_image
from llava_plugin.processing_llava_plugin import PLAIN_CHAT_TEMPLATE

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
# "chat": the model's own chat template; "plain": LLaVA's stage-1 format (image, caption, newline).
TEMPLATES = {"chat": None, "plain": PLAIN_CHAT_TEMPLATE}
# Where a record's image goes in its turn: "front" as the original's preprocessing puts it (`<image>\n` + text),
# "keep" where the data has it (front of the first question when unmarked), "random" before or after the question.
PLACEMENTS = ("front", "keep", "random")


class DataError(ValueError):
    """A record that cannot be trained on; the message names the file and record."""


@dataclass(frozen=True)
class EmbeddedImage:
    """Image bytes carried by the data itself (parquet, `datasets`); `key` names them in messages and caches."""

    data: bytes

    @property
    def key(self) -> str:
        return "sha1:" + hashlib.sha1(self.data).hexdigest()


ImageRef = str | EmbeddedImage


def image_key(image: ImageRef) -> str:
    return image.key if isinstance(image, EmbeddedImage) else image


def open_image(image: ImageRef, image_folder: str) -> Image.Image:
    """A decoded RGB image; ImageLoadError names the file or the embedded image."""
    if isinstance(image, str):
        return load_image(Path(image_folder) / image)
    try:
        opened = Image.open(io.BytesIO(image.data))
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"cannot read image {image.key} ({len(image.data)} embedded bytes): {error}") from error
    try:
        return load_image(opened)
    except ImageLoadError as error:
        raise ImageLoadError(f"cannot read image {image.key} ({len(image.data)} embedded bytes): {error}") from error


@dataclass(frozen=True)
class Record:
    id: str
    images: tuple[ImageRef, ...]
    conversations: tuple[tuple[str, str], ...]  # (role, text) with roles user/assistant/system
    source: str  # "file.json#12": the record's position, for messages


def parse_record(raw: dict, where: str, seed: int) -> Record:
    if not isinstance(raw, dict) or raw.get("id") is None:
        raise DataError(f"{where}: a record needs an 'id'")
    rid = str(raw["id"])
    images = parse_images(raw.get("image"), where, rid)
    return Record(rid, images, parse_turns(raw, where, rid, seed, bool(images)), where)


def parse_images(value, where: str, rid: str) -> tuple[ImageRef, ...]:
    """`image`: a path, bytes, an undecoded `datasets` Image ({"bytes", "path"}), or a list of these."""
    values = value if isinstance(value, (list, tuple)) else [value] if value not in (None, "") else []
    images = []
    for item in values:
        if isinstance(item, dict):  # a `datasets` Image feature read undecoded: bytes win, else the path
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray, memoryview)) and len(item):
            images.append(EmbeddedImage(bytes(item)))
        elif isinstance(item, str) and item:
            images.append(item)
        else:
            raise DataError(f"{where} ({rid}): 'image' must be a path, image bytes or a list of them, got {str(item)[:80]!r}")
    return tuple(images)


def parse_turns(raw: dict, where: str, rid: str, seed: int, has_image: bool) -> tuple[tuple[str, str], ...]:
    conversations = raw.get("conversations")
    if conversations is None:
        if not isinstance(raw.get("caption"), str) or not has_image:
            raise DataError(f"{where} ({rid}): needs 'conversations', or 'image' and 'caption'")
        question = random.Random(f"{seed}:{rid}:instruction").choice(BRIEF_INSTRUCTIONS)
        conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": raw["caption"]}]
    if not isinstance(conversations, (list, tuple)):
        raise DataError(f"{where} ({rid}): 'conversations' must be a list of turns, got {type(conversations).__name__}")
    turns = []
    for number, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from") if isinstance(turn, dict) else None)
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"{where} ({rid}): turn {number} needs 'from' (human/gpt) and a string 'value', got {turn!r}")
        turns.append((role, turn["value"]))
    return tuple(turns)


def place_images(record: Record, seed: int, placement: str = "front") -> list[tuple[str, str]]:
    """The turns with one `<image>` per image. A single image goes to the front of the turn holding it ("front",
    the original's rule), stays where the data put it ("keep"), or, where the data did not place it, before or
    after the question at random, seeded by record ("random"). Several images stay where the data put them (no rule
    of the original covers them); unplaced ones go to the front of the first question."""
    turns = list(record.conversations)
    count = len(record.images)
    markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
    if count and not markers:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise DataError(f"{record.source} ({record.id}): has an image but no user turn to hold it")
        role, text = turns[first_user]
        after = placement == "random" and count == 1 and random.Random(f"{seed}:{record.id}:image").random() >= 0.5
        turns[first_user] = (role, f"{text}\n{IMAGE_MARKER}" if after else f"{IMAGE_MARKER}\n" * count + text)
    elif markers != count:
        raise DataError(f"{record.source} ({record.id}): {markers} <image> markers for {count} images")
    elif count == 1 and placement == "front":
        turns = [(role, f"{IMAGE_MARKER}\n" + text.replace(IMAGE_MARKER, "").strip() if IMAGE_MARKER in text else text)
                 for role, text in turns]
    return turns


def to_messages(record: Record, seed: int, placement: str = "front") -> list[dict]:
    """Chat-template messages, images placed by `place_images`; roles must alternate after an optional system."""
    turns = place_images(record, seed, placement)
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
        # The template joins parts with "\\n", so the text beside a marker loses the newline it had.
        content = []
        for number, part in enumerate(parts):
            if number:
                content.append({"type": "image"})
            if part.strip("\n"):
                content.append({"type": "text", "text": part.strip("\n")})
        messages.append({"role": role, "content": content})
    return messages


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,) -100 outside the answers
    pixel_values: torch.Tensor | None  # (images, 3, H, W); AnyRes: (all images' tiles, 3, H, W)
    image_sizes: torch.Tensor | None = None  # AnyRes only: (images, 2) original height, width


# Stands in for the image when only the token layout is needed (cached vision features): the processor expands
# <image> the same way whatever the picture.
_PLACEHOLDER = Image.new("RGB", (1, 1))


def encode(record: Record, processor, seed: int, max_length: int, image_folder: str, load_pixels: bool = True,
           template: str = "chat", placement: str = "front") -> Encoded:
    """Raises DataError (bad record or too long) or ImageLoadError (unreadable image). `template` "chat" renders
    with the model's chat template, "plain" with LLaVA's stage-1 format (see TEMPLATES)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"image placement must be one of {PLACEMENTS}, got {placement!r}")
    messages = to_messages(record, seed, placement)
    if template == "plain" and [m["role"] for m in messages] != ["user", "assistant"]:
        raise DataError(f"{record.source} ({record.id}): the plain template takes one question and one answer (a caption), "
                        f"got {len(messages)} turns")
    images = [open_image(image, image_folder) if load_pixels else _PLACEHOLDER for image in record.images]
    parts = [part for message in messages if isinstance(message["content"], list)
             for part in message["content"] if part.get("type") == "image"]
    for part, image in zip(parts, images):
        part["image"] = image
    try:
        out = processor.apply_chat_template(
            messages, chat_template=TEMPLATES[template], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, return_tensors="pt",
        )
    except (ValueError, TemplateError) as error:  # over the model's context, markers or turns the template refuses
        raise DataError(f"{record.source} ({record.id}): {error}") from error
    input_ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    if len(input_ids) > max_length:
        raise DataError(f"{record.source} ({record.id}): {len(input_ids)} tokens, over --max-length {max_length}")
    if not mask.any():
        raise DataError(f"{record.source} ({record.id}): the answers tokenized to nothing")
    labels = input_ids.masked_fill(~mask, -100)
    pixels = bool(images) and load_pixels
    return Encoded(input_ids, labels, out["pixel_values"] if pixels else None, out.get("image_sizes") if pixels else None)


__all__ = ["BRIEF_INSTRUCTIONS", "DataError", "EmbeddedImage", "Encoded", "ImageLoadError", "PLACEMENTS", "Record", "TEMPLATES",
           "encode", "image_key", "open_image", "parse_record", "place_images", "to_messages"]
