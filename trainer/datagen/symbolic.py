"""The text a drafter is shown instead of the image: captions one per line, then `label: [x1, y1, x2, y2]`
per box, normalized to [0, 1] with at most 3 decimals (the paper's format)."""

from .annotations import ImageAnnotation


def format_number(value: float) -> str:
    return f"{round(value, 3):.3f}".rstrip("0").rstrip(".") if value not in (0, 1) else f"{value:.1f}"


def symbolic_text(annotation: ImageAnnotation) -> str:
    lines = list(annotation.captions)
    for label, box in annotation.normalized_boxes():
        lines.append(f"{label}: [{', '.join(format_number(value) for value in box)}]")
    return "\n".join(lines)
