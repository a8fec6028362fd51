"""The text a drafter is shown instead of the image: captions one per line, then `label: [x1, y1, x2, y2]`
per box, normalized to [0, 1] with at most 3 decimals (the paper's format)."""

from .annotations import ImageAnnotation


def format_number(value: float) -> str:
    return f"{round(value, 3):.3f}".rstrip("0").rstrip(".") if value not in (0, 1) else f"{value:.1f}"


def box_lines(annotation: ImageAnnotation) -> list[str]:
    return [f"{label}: [{', '.join(format_number(value) for value in box)}]" for label, box in annotation.normalized_boxes()]


def symbolic_text(annotation: ImageAnnotation) -> str:
    return "\n".join([*annotation.captions, *box_lines(annotation)])


def original_context(annotation: ImageAnnotation, with_boxes: bool) -> str:
    """The context as the original's prompt folder shows it: the captions one per line; for detailed descriptions and
    complex reasoning also a blank line and then the boxes."""
    captions = "\n".join(annotation.captions)
    return f"{captions}\n\n" + "\n".join(box_lines(annotation)) if with_boxes else captions
