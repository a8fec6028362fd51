"""Which system message and few-shot examples a draft is asked with, and what context the drafter sees.

Built in: this project's own prompts (prompts.py), each kind seeing captions and boxes. `--prompts DIR`: the original
LLaVA's prompt folder, read from the user's copy at run time (none of its text is kept here):
  DIR/conversation/, DIR/detail_description/, DIR/complex_reasoning/, each with `system_message.txt` and few-shot
  pairs `000_caps.txt` (the context) / `000_conv.txt` (the answer), `001_...`, sorted by number.
They are sent as the paper describes its data engine: the system message, then each pair as a user and an assistant
message, then the image's context. Each kind sees what the original gives it: conversations the captions only,
detailed descriptions and complex reasoning the captions, a blank line and the boxes.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from .annotations import AnnotationError, ImageAnnotation
from .prompts import FEW_SHOTS, KINDS, SYSTEM_MESSAGES
from .symbolic import original_context, symbolic_text

FOLDERS = {"conversation": "conversation", "detail": "detail_description", "complex": "complex_reasoning"}
SEES_BOXES = {"conversation": False, "detail": True, "complex": True}
PAIR_FILE = re.compile(r"^(\d+)_(caps|conv)\.txt$")


@dataclass(frozen=True)
class PromptSet:
    system: dict[str, str]
    few_shots: dict[str, list[tuple[str, str]]]
    original: bool = False  # the original's folder: its per-kind context layout
    source: str = "built-in prompts"

    def context(self, kind: str, annotation: ImageAnnotation) -> str:
        return original_context(annotation, SEES_BOXES[kind]) if self.original else symbolic_text(annotation)

    def messages(self, kind: str, annotation: ImageAnnotation) -> list[dict]:
        """System, the few-shots as user/assistant turns, then this image's context."""
        messages = [{"role": "system", "content": self.system[kind]}]
        for example, answer in self.few_shots[kind]:
            messages += [{"role": "user", "content": example}, {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": self.context(kind, annotation)}]


BUILTIN = PromptSet(SYSTEM_MESSAGES, FEW_SHOTS)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: cannot read it ({error})") from None
    if not text:
        raise AnnotationError(f"{path}: empty")
    return text


def load_prompt_folder(folder: str | Path, kinds=KINDS) -> PromptSet:
    """The original's prompt folder, for the kinds asked; a missing file or an unpaired example is an error naming it."""
    folder = Path(folder)
    system, few_shots = {}, {}
    for kind in kinds:
        sub = folder / FOLDERS[kind]
        if not sub.is_dir():
            raise AnnotationError(f"{sub}: no such folder (--prompts needs {', '.join(FOLDERS[k] + '/' for k in kinds)})")
        system[kind] = _read(sub / "system_message.txt")
        pairs: dict[str, dict[str, Path]] = {}
        for path in sub.iterdir():
            match = PAIR_FILE.match(path.name)
            if match:
                pairs.setdefault(match.group(1), {})[match.group(2)] = path
        for number, pair in sorted(pairs.items(), key=lambda item: int(item[0])):
            if len(pair) != 2:
                have = next(iter(pair.values()))
                raise AnnotationError(f"{have}: no {number}_{'conv' if 'caps' in pair else 'caps'}.txt to pair it with")
        few_shots[kind] = [(_read(pair["caps"]), _read(pair["conv"])) for _, pair in sorted(pairs.items(), key=lambda i: int(i[0]))]
    return PromptSet(system, few_shots, original=True, source=str(folder))
