"""ScienceQA-style multiple-choice accuracy: a question, an optional context and image, lettered options; the model
answers "The answer is X." and is scored per subject and overall.

Input: JSONL lines {id, question, options: [..], answer: "B" or 1, context?, image?, subject?}, or ScienceQA's own
problems.json ({id: {question, choices, answer (index), hint, image, subject, split}}, images under
<image folder>/<split>/<id>/<image>)."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .report import table
from .results import ResultLog, read_jsonl_objects

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The original LLaVA ScienceQA prompt layout (context, question, options), answered as "The answer is X."
DEFAULT_FORMAT = "Context: {context}\nQuestion: {question}\nOptions: {options}\nAnswer with \"The answer is\" and the option's letter."
ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b\)?")
LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[).:,]|\s|$)")


@dataclass
class Problem:
    id: str
    question: str
    options: list[str]
    answer: int
    context: str = ""
    image: str | None = None
    subject: str = "all"


def _answer_index(value, options: list[str], where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
        return value
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:len(options)]:
        return LETTERS.index(value.strip().upper())
    raise ValueError(f"{where}: answer {value!r} is neither an option letter nor an index of the {len(options)} options")


def load_problems(path: Path, split: str | None = None) -> list[Problem]:
    path = Path(path)
    if path.suffix == ".json":  # ScienceQA problems.json
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected ScienceQA's problems.json, an object keyed by problem id")
        problems = []
        for problem_id, row in raw.items():
            if split and row.get("split") != split:
                continue
            where = f"{path} [{problem_id}]"
            if not row.get("choices"):
                raise ValueError(f"{where}: no choices")
            image = f"{row.get('split', '')}/{problem_id}/{row['image']}".lstrip("/") if row.get("image") else None
            problems.append(Problem(str(problem_id), row["question"], row["choices"], _answer_index(row["answer"], row["choices"], where),
                                    row.get("hint") or "", image, row.get("subject") or "all"))
        return problems
    problems, seen = [], set()
    for where, row in read_jsonl_objects(path):
        missing = [key for key in ("id", "question", "options", "answer") if key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(row["options"], list) or not 2 <= len(row["options"]) <= len(LETTERS):
            raise ValueError(f"{where}: options must be a list of 2 to {len(LETTERS)} strings")
        if str(row["id"]) in seen:
            raise ValueError(f"{where}: id {row['id']} appears twice")
        seen.add(str(row["id"]))
        problems.append(Problem(str(row["id"]), row["question"], [str(option) for option in row["options"]],
                                _answer_index(row["answer"], row["options"], where), row.get("context") or "",
                                row.get("image"), row.get("subject") or "all"))
    return problems


def prompt(problem: Problem, template: str = DEFAULT_FORMAT) -> str:
    options = " ".join(f"({LETTERS[index]}) {option}" for index, option in enumerate(problem.options))
    return template.format(context=problem.context or "N/A", question=problem.question, options=options)


def parse_choice(answer: str, options: list[str]) -> int | None:
    """The chosen option: "The answer is X", else a leading letter, else an answer that is exactly one option's text."""
    letters = LETTERS[:len(options)]
    match = ANSWER_IS.search(answer) or LEADING_LETTER.match(answer.strip())
    if match and match.group(1) in letters:
        return letters.index(match.group(1))
    said = answer.strip().rstrip(".").strip().lower()
    exact = [index for index, option in enumerate(options) if option.strip().lower() == said]
    return exact[0] if len(exact) == 1 else None


def evaluate_multiple_choice(problems: list[Problem], answer, answers_path: Path, template: str = DEFAULT_FORMAT,
                             progress: bool = True) -> dict:
    """`answer(problem, prompt) -> str` is the model. Returns accuracy per subject and overall, and unparsed counts."""
    with ResultLog(answers_path) as log:
        for problem in tqdm(problems, desc="multiple choice", disable=not progress):
            if problem.id in log:
                continue
            text = answer(problem, prompt(problem, template))
            choice = parse_choice(text, problem.options)
            log.add({"id": problem.id, "subject": problem.subject, "answer": text,
                     "choice": None if choice is None else LETTERS[choice], "correct": LETTERS[problem.answer],
                     "right": choice == problem.answer})
        entries = [log[problem.id] for problem in problems]
    scores = {}
    for subject in sorted({entry["subject"] for entry in entries}) + ["overall"]:
        chosen = [entry for entry in entries if subject in ("overall", entry["subject"])]
        scores[subject] = {"accuracy": sum(entry["right"] for entry in chosen) / len(chosen), "questions": len(chosen),
                           "unparsed": sum(entry["choice"] is None for entry in chosen)}
    return scores


def multiple_choice_report(scores: dict, model: str, template: str) -> str:
    rows = [[subject, f"{100 * s['accuracy']:.2f}%", s["questions"], s["unparsed"]] for subject, s in scores.items()]
    return (f"# Multiple-choice accuracy: {model}\n\nPrompt format:\n\n```\n{template}\n```\n\n"
            + table(["subject", "accuracy", "questions", "unparsed answers"], rows) + "\n")
