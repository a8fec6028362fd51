"""Multiple-choice accuracy (ScienceQA style): a question, an optional context and image, lettered options; the
model's answer is read for a letter and scored per group (ScienceQA: the paper's columns) and overall.

Input: JSONL lines {id, question, options: [..], answer: "B" or 1, context?, image?, subject?}, or ScienceQA's own
files (scienceqa.py). Prompts: a named preset (PRESETS) or a template with {context}, {question}, {options}.
Answers are read as the original's eval_science_qa.py reads them (`read_choice`); `parse_choice` is a lenient reader
for models that were not trained on the format."""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from llava_plugin import ImageLoadError

from .options import PRESET_NAMES
from .report import table
from .results import ResultLog, read_jsonl_objects

logger = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b\)?")
LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[).:,]|\s|$)")
# LLaVA-1.5's single-prediction instruction (the ScienceQA protocol of its paper, model_vqa_science --single-pred-prompt)
SINGLE_PREDICTION = "Answer with the option's letter from the given choices directly."


@dataclass
class Problem:
    id: str
    question: str
    options: list[str]
    answer: int
    context: str = ""
    image: str | None = None
    subject: str = "all"
    groups: tuple[str, ...] = ()  # the report's columns this problem counts in (default: its subject)


def _own_format(problem: Problem) -> str:
    options = " ".join(f"({LETTERS[index]}) {option}" for index, option in enumerate(problem.options))
    return (f"Context: {problem.context or 'N/A'}\nQuestion: {problem.question}\nOptions: {options}\n"
            "Answer with \"The answer is\" and the option's letter.")


def _qcm_lea(problem: Problem) -> str:
    """LLaVA's ScienceQA prompt (QCM: question, context, options; the model answers lecture, explanation, "The answer
    is X."), as its conversion wrote it: double spaces collapsed, the "Question: " label dropped."""
    options = " ".join(f"({LETTERS[index]}) {option}" for index, option in enumerate(problem.options))
    text = f"Question: {problem.question}\nContext: {problem.context.strip() or 'N/A'}\nOptions: {options}\n"
    return text.replace("  ", " ").strip().removeprefix("Question: ")


def _single_prediction(problem: Problem) -> str:
    """LLaVA-1.5's: the context line (when there is one), the question, one `X. option` line each, then the instruction."""
    context = f"Context: {problem.context.strip()}\n" if problem.context.strip() else ""
    options = "\n".join(f"{LETTERS[index]}. {option}" for index, option in enumerate(problem.options))
    return f"{context}{problem.question}\n{options}".replace("  ", " ") + "\n" + SINGLE_PREDICTION


PRESETS = dict(zip(PRESET_NAMES, (_own_format, _qcm_lea, _single_prediction)))


def prompt_builder(format_or_preset: str):
    """A preset's name, or a template with {context}, {question} and {options} -> problem -> prompt text."""
    if format_or_preset in PRESETS:
        return PRESETS[format_or_preset]
    if "{question}" not in format_or_preset:
        raise ValueError(f"--prompt-format: {format_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                         "template with {question}")
    return lambda problem: prompt(problem, format_or_preset)


def prompt(problem: Problem, template: str) -> str:
    options = " ".join(f"({LETTERS[index]}) {option}" for index, option in enumerate(problem.options))
    return template.format(context=problem.context or "N/A", question=problem.question, options=options)


def read_choice(answer: str, options: list[str]) -> int | None:
    """The original's reading: newlines become ". "; then a lone letter, or "X. " at the start, or "The answer is X."
    (then "The answer is X"); anything else, or a letter past the options, is no choice. "A magnet." is not A."""
    text = (answer or "").replace("\n", ". ")
    letters = list(LETTERS[:max(len(options), 5)])  # the original always allows A-E, then checks the count
    span = f"[A-{letters[-1]}]"
    if text.strip() in letters:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        letter = text[0]
    elif "The answer is " in text:
        match = re.search(rf"The answer is ({span})\.", text) or re.search(rf"The answer is ({span})", text)
        letter = match.group(1) if match else None
    else:
        letter = None
    return LETTERS.index(letter) if letter and letter in LETTERS[:len(options)] else None


def parse_choice(answer: str, options: list[str]) -> int | None:
    """Lenient: "The answer is X" anywhere, else a leading letter, else an answer that is exactly one option's text."""
    letters = LETTERS[:len(options)]
    match = ANSWER_IS.search(answer) or LEADING_LETTER.match(answer.strip())
    if match and match.group(1) in letters:
        return letters.index(match.group(1))
    said = answer.strip().rstrip(".").strip().lower()
    exact = [index for index, option in enumerate(options) if option.strip().lower() == said]
    return exact[0] if len(exact) == 1 else None


def answer_index(value, options: list, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
        return value
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:len(options)]:
        return LETTERS.index(value.strip().upper())
    raise ValueError(f"{where}: answer {value!r} is neither an option letter nor an index of the {len(options)} options")


def load_jsonl_problems(path: Path) -> list[Problem]:
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
        subject = row.get("subject") or "all"
        problems.append(Problem(str(row["id"]), row["question"], [str(option) for option in row["options"]],
                                answer_index(row["answer"], row["options"], where), row.get("context") or "",
                                row.get("image"), subject, (subject,)))
    return problems


def evaluate_multiple_choice(problems: list[Problem], answer, answers_path: Path, build_prompt=_own_format,
                             reader=read_choice, progress: bool = True, order: tuple[str, ...] = ()) -> dict:
    """`answer(problem, prompt) -> str` is the model. Returns accuracy per group (in `order`, then the others) and
    overall, with the unparsed answers and the problems whose image could not be read (counted wrong, tried again by
    the next run)."""
    with ResultLog(answers_path) as log:
        for problem in tqdm(problems, desc="multiple choice", disable=not progress):
            if problem.id in log and not log[problem.id].get("failed"):
                continue
            entry = {"id": problem.id, "groups": list(problem.groups or (problem.subject,)), "correct": LETTERS[problem.answer]}
            text = build_prompt(problem)
            try:
                said = answer(problem, text)
            except ImageLoadError as error:
                logger.warning("problem %s: %s; counted as failed", problem.id, error)
                log.add(entry | {"prompt": text, "failed": True, "error": str(error), "choice": None, "right": False})
                continue
            choice = reader(said, problem.options)
            log.add(entry | {"prompt": text, "answer": said, "choice": None if choice is None else LETTERS[choice],
                             "right": choice == problem.answer})
        entries = [log[problem.id] for problem in problems]
    seen = {group for entry in entries for group in entry["groups"]}
    scores = {}
    for group in [g for g in order if g in seen] + sorted(seen - set(order)) + ["overall"]:
        chosen = [entry for entry in entries if group == "overall" or group in entry["groups"]]
        scores[group] = {"accuracy": sum(entry["right"] for entry in chosen) / len(chosen), "questions": len(chosen),
                         "unparsed": sum(entry["choice"] is None and not entry.get("failed") for entry in chosen),
                         "failed": sum(bool(entry.get("failed")) for entry in chosen)}
    return scores


def multiple_choice_report(scores: dict, model: str, prompt_format: str, reader: str) -> str:
    rows = [[group, f"{100 * s['accuracy']:.2f}%", s["questions"], s["unparsed"], s["failed"]] for group, s in scores.items()]
    return (f"# Multiple-choice accuracy: {model}\n\nPrompt: `{prompt_format}`; answers read {reader}.\n\n"
            + table(["group", "accuracy", "questions", "unparsed answers", "failed (image unreadable)"], rows) + "\n")
