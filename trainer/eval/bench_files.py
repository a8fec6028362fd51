"""LLaVA-Bench's files as the original released them, read unchanged.

- questions (`qa90_questions.jsonl`, `questions.jsonl`): {question_id, image, text, category}, category `conv`,
  `detail` or `complex` (`conversation` is read as `conv`); `context` and `reference` may also be given inline.
- context, one line per image, matched by `image`:
  COCO (`caps_boxes_coco2014_val_80.jsonl`): {id, image, captions: [...], instances: [{category, bbox}]}, bbox
  [x1, y1, x2, y2] normalized; rendered as the original's review script renders it: the captions one per line, a blank
  line, then one `category: [x1, y1, x2, y2]` line per instance (the list printed as Python prints it).
  In the wild (`context.jsonl`): {id, image, caption}, a human's description, given as it is.
- reference answers (`qa90_gpt4_answer.jsonl`, `answers_gpt4.jsonl`): {question_id, text}.
"""

from dataclasses import dataclass
from pathlib import Path

from trainer.datagen.annotations import check_caps_boxes

from .results import read_jsonl_objects

CATEGORIES = ("conv", "detail", "complex")
CATEGORY_ALIASES = {"conversation": "conv"}
# Which kind of description the judge reads: the original judges each with its own rule (see rules.py).
CAPS_BOXES, CAPTION, INLINE = "caps_boxes", "caption", "inline"


@dataclass
class Question:
    question_id: str
    image: str | None
    text: str
    category: str
    context: str
    reference: str | None = None
    context_kind: str = INLINE


def render_caps_boxes(row: dict, where: str) -> str:
    captions, instances = check_caps_boxes(row, where)
    # each box as the original's f-string prints the list it read from JSON (Python's repr: 0 stays 0, 0.5 stays 0.5)
    boxes = [f"{instance['category']}: {instance['bbox']}" for instance in instances]
    return "\n".join(captions) + "\n\n" + "\n".join(boxes)


def read_context(path: Path) -> dict[str, tuple[str, str]]:
    """image -> (rendered context, kind) from a COCO caps_boxes file or an in-the-wild context file."""
    contexts = {}
    for where, row in read_jsonl_objects(path):
        if "image" not in row:
            raise ValueError(f"{where}: no 'image' to match the questions by")
        if "captions" in row or "instances" in row:
            contexts[row["image"]] = (render_caps_boxes(row, where), CAPS_BOXES)
        elif isinstance(row.get("caption"), (str, list)):
            caption = row["caption"]
            contexts[row["image"]] = ("\n".join(caption) if isinstance(caption, list) else caption, CAPTION)
        elif isinstance(row.get("context"), str):
            contexts[row["image"]] = (row["context"], INLINE)
        else:
            raise ValueError(f"{where}: expected 'captions' and 'instances' (COCO) or 'caption' (in the wild)")
    return contexts


def category_of(value, where: str) -> str:
    category = CATEGORY_ALIASES.get(value, value)
    if category not in CATEGORIES:
        raise ValueError(f"{where}: category {value!r} is not one of {', '.join(CATEGORIES)}")
    return category


def load_questions(path: Path, contexts: Path | None = None, references: Path | None = None) -> list[Question]:
    context_by_image = read_context(contexts) if contexts else {}
    reference_by_id = {}
    for where, row in read_jsonl_objects(references) if references else []:
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise ValueError(f"{where}: a reference answer needs 'question_id' and 'text'")
        reference_by_id[str(row["question_id"])] = row["text"]
    questions, seen = [], set()
    for where, row in read_jsonl_objects(path):
        missing = [key for key in ("question_id", "text", "category") if key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        question_id = str(row["question_id"])
        if question_id in seen:
            raise ValueError(f"{where}: question_id {question_id} appears twice")
        seen.add(question_id)
        category = category_of(row["category"], where)
        if row.get("context"):
            context = row["context"]
            context, kind = ("\n".join(map(str, context)) if isinstance(context, list) else context), INLINE
        elif row.get("image") in context_by_image:
            context, kind = context_by_image[row["image"]]
        else:
            raise ValueError(f"{where}: no context for image {row.get('image')!r} (give 'context' or a --context file)")
        questions.append(Question(question_id, row.get("image"), row["text"], category, context,
                                  row.get("reference") or reference_by_id.get(question_id), kind))
    return questions
