"""ScienceQA's own files: `problems.json` ({pid: {question, choices, answer (index), hint, image, subject, grade,
split, ...}}) and, beside it, `pid_splits.json` ({"train", "val", "test", "minival", "minitest": [pid, ...]}), which
the original's scripts take the splits from. Images lie at `<image folder>/<problem's split>/<pid>/<image>`.

Each problem counts in the paper's columns: subject (NAT, SOC, LAN), context modality (TXT: a text hint; IMG: an
image; NO: neither; TXT and IMG can both hold), grade (G1-6, G7-12)."""

import json
from pathlib import Path

from .multiple_choice import Problem, answer_index

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None


def columns(row: dict) -> tuple[str, ...]:
    found = []
    if row.get("subject") in SUBJECTS:
        found.append(SUBJECTS[row["subject"]])
    hint, image = (row.get("hint") or "").strip(), row.get("image")
    found += (["TXT"] if hint else []) + (["IMG"] if image else []) + ([] if hint or image else ["NO"])
    grade = str(row.get("grade") or "")
    if grade.startswith("grade") and grade[5:].isdigit():
        found.append("G1-6" if int(grade[5:]) <= 6 else "G7-12")
    return tuple(found)


def split_ids(path: Path, raw: dict, split: str | None) -> list[str]:
    """The problem ids of `split`, in the order pid_splits.json lists them; without the file, each problem's own
    `split` field; no split: every problem."""
    if split is None:
        return list(raw)
    splits_path = path.with_name("pid_splits.json")
    if splits_path.is_file():
        splits = _read(splits_path)
        if split not in splits:
            raise ValueError(f"{splits_path}: no split {split!r} (it has {', '.join(splits)})")
        unknown = [pid for pid in splits[split] if str(pid) not in raw]
        if unknown:
            raise ValueError(f"{splits_path}: split {split!r} names problems not in {path.name}: {unknown[:5]}")
        return [str(pid) for pid in splits[split]]
    ids = [pid for pid, row in raw.items() if row.get("split") == split]
    if not ids:
        raise ValueError(f"{path}: no problem has split {split!r} and there is no pid_splits.json beside it")
    return ids


def load_scienceqa(path: Path, split: str | None = None) -> list[Problem]:
    raw = _read(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected ScienceQA's problems.json, an object keyed by problem id")
    problems = []
    for problem_id in split_ids(path, raw, split):
        row, where = raw[problem_id], f"{path} [{problem_id}]"
        if not isinstance(row, dict) or not row.get("choices") or "question" not in row:
            raise ValueError(f"{where}: needs 'question' and 'choices'")
        image = f"{row.get('split', '')}/{problem_id}/{row['image']}".lstrip("/") if row.get("image") else None
        problems.append(Problem(str(problem_id), row["question"], [str(c) for c in row["choices"]],
                                answer_index(row.get("answer"), row["choices"], where), row.get("hint") or "", image,
                                row.get("subject") or "all", columns(row)))
    return problems
