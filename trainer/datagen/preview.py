"""What the app's data tab needs around drafting: an annotation from pasted text or one JSONL record, the image with
its boxes drawn, and records shown as chat turns."""

import json
import re

from PIL import Image, ImageDraw

from .annotations import AnnotationError, ImageAnnotation, parse_record

BOX_LINE = re.compile(r"^\s*(?P<label>[^:]+?)\s*:\s*\[(?P<numbers>[^\]]*)\]\s*$")


def annotation_from_text(record_json: str, captions: str, boxes: str, width: int | None, height: int | None) -> ImageAnnotation:
    """A pasted JSONL record wins; otherwise captions (one per line) and boxes (`label: [x1, y1, x2, y2]` in pixels)."""
    if record_json and record_json.strip():
        try:
            record = json.loads(record_json)
        except json.JSONDecodeError as error:
            raise AnnotationError(f"the pasted record is not valid JSON: {error.msg}") from error
        return parse_record(record, "pasted record")
    parsed = []
    for number, line in enumerate((boxes or "").splitlines(), start=1):
        if not line.strip():
            continue
        match = BOX_LINE.match(line)
        try:
            values = [float(value) for value in match.group("numbers").split(",")] if match else []
        except ValueError:
            values = []
        if len(values) != 4:
            raise AnnotationError(f"box line {number} should read `label: [x1, y1, x2, y2]`, got {line.strip()!r}")
        parsed.append({"label": match.group("label"), "bbox": values})
    record = {"id": "pasted", "image": "pasted.png", "width": int(width or 0), "height": int(height or 0),
              "captions": [line for line in (captions or "").splitlines() if line.strip()], "boxes": parsed}
    return parse_record(record, "pasted annotation")


def draw_boxes(image: Image.Image, annotation: ImageAnnotation) -> Image.Image:
    """The image with each box outlined and labelled, scaled from the annotation's size to the image's."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    if annotation.width:
        scale_x, scale_y = canvas.width / annotation.width, canvas.height / annotation.height
    else:  # normalized boxes (caps_boxes records)
        scale_x, scale_y = canvas.width, canvas.height
    for box in annotation.boxes:
        x1, y1, x2, y2 = box.bbox
        corners = (x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y)
        draw.rectangle(corners, outline=(255, 0, 255), width=max(2, canvas.width // 200))
        draw.text((corners[0] + 3, corners[1] + 2), box.label, fill=(255, 0, 255))
    return canvas


def as_chat(records: list[dict]) -> list[dict]:
    """LLaVA records -> chat messages for display, one header line per record."""
    messages = []
    for record in records:
        messages.append({"role": "assistant", "content": f"**{record['id']}**"})
        for turn in record["conversations"]:
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]})
    return messages
