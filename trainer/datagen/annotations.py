"""The symbolic view of an image that the drafter sees: its captions and labelled pixel boxes.

Input formats: COCO (a captions file and an instances file), and JSONL, one image per line, either ours, in pixels:
{"id", "image", "width", "height", "captions": [...], "boxes": [{"label", "bbox": [x1, y1, x2, y2]}]}, or the
original LLaVA's caps_boxes form (caps_boxes_coco2014_val_80.jsonl), already normalized to 0..1:
{"id", "image", "captions": [...], "instances": [{"category", "bbox": [x1, y1, x2, y2]}]}.
Every problem is an error naming the file and the line (or COCO id): nothing is skipped silently.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path


class AnnotationError(ValueError):
    """Bad input annotations; the message says which file and which record."""


@dataclass(frozen=True)
class Box:
    label: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels, or in 0..1 when the image has no size


@dataclass(frozen=True)
class ImageAnnotation:
    id: str
    image: str
    width: int | None  # None: the boxes are already normalized (caps_boxes records)
    height: int | None
    captions: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = field(default_factory=tuple)

    def normalized_boxes(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """(label, [x1, y1, x2, y2] in [0, 1]) per box, clamped to the image."""
        scale = (self.width, self.height, self.width, self.height) if self.width else (1, 1, 1, 1)
        return [
            (box.label, tuple(min(max(value / side, 0.0), 1.0) for value, side in zip(box.bbox, scale)))
            for box in self.boxes
        ]


def parse_record(record: dict, where: str) -> ImageAnnotation:
    """One JSONL record -> ImageAnnotation; `where` ('file.jsonl:12') goes into every error."""
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "instances" in record and "boxes" not in record:
        return parse_caps_boxes(record, where)
    missing = [key for key in ("id", "image", "width", "height") if key not in record]
    if missing:
        raise AnnotationError(f"{where}: missing {', '.join(missing)}")
    width, height = record["width"], record["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise AnnotationError(f"{where}: width and height must be positive integers, got {width!r} x {height!r}")
    captions = record.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        raise AnnotationError(f"{where}: captions must be a list of strings")
    boxes = []
    for index, box in enumerate(record.get("boxes", [])):
        bbox = box.get("bbox") if isinstance(box, dict) else None
        if not (isinstance(box, dict) and isinstance(box.get("label"), str) and box["label"].strip()
                and isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise AnnotationError(f"{where}: boxes[{index}] must be {{'label': str, 'bbox': [x1, y1, x2, y2]}}, got {box!r}")
        if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            raise AnnotationError(f"{where}: boxes[{index}] ({box['label']}) has x2 <= x1 or y2 <= y1: {bbox}")
        boxes.append(Box(box["label"].strip(), tuple(float(v) for v in bbox)))
    captions = tuple(caption.strip() for caption in captions if caption.strip())
    if not captions and not boxes:
        raise AnnotationError(f"{where}: no captions and no boxes: nothing to draft from")
    return ImageAnnotation(str(record["id"]), str(record["image"]), width, height, captions, tuple(boxes))


def check_caps_boxes(record: dict, where: str) -> tuple[list[str], list[dict]]:
    """A caps_boxes record's captions and instances as given, once checked: boxes are normalized x1, y1, x2, y2."""
    missing = [key for key in ("id", "image") if key not in record]
    if missing:
        raise AnnotationError(f"{where}: missing {', '.join(missing)}")
    captions, instances = record.get("captions", []), record.get("instances", [])
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        raise AnnotationError(f"{where}: captions must be a list of strings")
    if not isinstance(instances, list):
        raise AnnotationError(f"{where}: instances must be a list")
    for index, instance in enumerate(instances):
        bbox = instance.get("bbox") if isinstance(instance, dict) else None
        if not (isinstance(instance, dict) and isinstance(instance.get("category"), str) and instance["category"].strip()
                and isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise AnnotationError(f"{where}: instances[{index}] must be {{'category': str, 'bbox': [x1, y1, x2, y2]}}, "
                                  f"got {instance!r}")
        if not all(-0.01 <= value <= 1.01 for value in bbox) or bbox[2] < bbox[0] or bbox[3] < bbox[1]:
            # Rounding to 3 decimals can make a tiny box zero-wide, and COCO boxes can overhang the image by a pixel:
            # both allowed (drafting clamps to the image); a reversed box, or pixels, are not.
            raise AnnotationError(f"{where}: instances[{index}] ({instance['category']}) is not a normalized "
                                  f"x1 <= x2, y1 <= y2 box in 0..1: {bbox}")
    return captions, instances


def parse_caps_boxes(record: dict, where: str) -> ImageAnnotation:
    """A caps_boxes record: captions and `instances` whose boxes are already normalized (no image size)."""
    captions, instances = check_caps_boxes(record, where)
    boxes = tuple(Box(item["category"].strip(), tuple(float(v) for v in item["bbox"])) for item in instances)
    captions = tuple(caption.strip() for caption in captions if caption.strip())
    if not captions and not boxes:
        raise AnnotationError(f"{where}: no captions and no instances: nothing to draft from")
    return ImageAnnotation(str(record["id"]), str(record["image"]), None, None, captions, boxes)


def load_jsonl(path: Path) -> list[ImageAnnotation]:
    annotations = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            annotations.append(parse_record(record, f"{path}:{number}"))
    return _unique(annotations, path)


def load_coco(captions_path: Path, instances_path: Path) -> list[ImageAnnotation]:
    """COCO captions + instances -> one annotation per image that has captions or boxes; bbox [x, y, w, h] -> xyxy."""
    captions_data, instances_data = _read_json(captions_path), _read_json(instances_path)
    for path, data, key in ((captions_path, captions_data, "caption"), (instances_path, instances_data, "bbox")):
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise AnnotationError(f"{path}: not a COCO file (needs 'images' and 'annotations')")
        if data["annotations"] and key not in data["annotations"][0]:
            raise AnnotationError(f"{path}: its annotations have no {key!r}: pass the captions file, then the instances file")
    names = {category["id"]: category["name"] for category in instances_data.get("categories", [])}
    images = {image["id"]: image for image in [*captions_data["images"], *instances_data["images"]]}
    captions: dict[int, list[str]] = {}
    for annotation in captions_data["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    boxes: dict[int, list[dict]] = {}
    for annotation in instances_data["annotations"]:
        if annotation["category_id"] not in names:
            raise AnnotationError(f"{instances_path}: annotation {annotation.get('id')} has unknown category {annotation['category_id']}")
        x, y, w, h = annotation["bbox"]
        if w > 0 and h > 0:  # COCO holds a few zero-area boxes: they carry no position to describe
            boxes.setdefault(annotation["image_id"], []).append({"label": names[annotation["category_id"]], "bbox": [x, y, x + w, y + h]})
    annotations = []
    for image_id in sorted(set(captions) | set(boxes)):
        if image_id not in images:
            raise AnnotationError(f"{captions_path} / {instances_path}: annotations refer to image {image_id}, which is not listed")
        image = images[image_id]
        record = {"id": image_id, "image": image["file_name"], "width": image["width"], "height": image["height"],
                  "captions": captions.get(image_id, []), "boxes": boxes.get(image_id, [])}
        annotations.append(parse_record(record, f"COCO image {image_id}"))
    return annotations


def load_annotations(paths: list[str | Path]) -> list[ImageAnnotation]:
    """One .jsonl file, or two COCO files (captions, instances)."""
    paths = [Path(path) for path in paths]
    for path in paths:
        if not path.is_file():
            raise AnnotationError(f"{path}: no such file")
    if len(paths) == 1 and paths[0].suffix == ".jsonl":
        return load_jsonl(paths[0])
    if len(paths) == 2:
        return load_coco(*paths)
    raise AnnotationError(f"expected one .jsonl file or two COCO files (captions, instances), got {[str(p) for p in paths]}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AnnotationError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error


def _unique(annotations: list[ImageAnnotation], path: Path) -> list[ImageAnnotation]:
    seen = set()
    for annotation in annotations:
        if annotation.id in seen:
            raise AnnotationError(f"{path}: id {annotation.id!r} appears twice")
        seen.add(annotation.id)
    return annotations
