"""The shapes world's held-out accuracy per question type: every canonical question of every held-out image, answered
greedily and judged by its key word (`trainer.shapes.world.judge`)."""

import logging
import random
from pathlib import Path

from tqdm.auto import tqdm

from llava_plugin import ImageLoadError

from trainer.shapes.report import position_outcomes_sentence
from trainer.shapes.world import KINDS, POSITION_OUTCOMES, judge, position_outcome, questions

from .candidate import Candidate
from .report import table
from .results import ResultLog, read_jsonl_objects

logger = logging.getLogger(__name__)


def evaluate_shapes(candidate: Candidate, records: list[dict], image_folder: Path, answers_path: Path, seed: int = 0,
                    progress: bool = True, opener: str | None = None) -> dict:
    """Scores per kind from `answers_path` (JSONL, one line per question; resumed when it exists).

    `opener`: ask every question as the second turn, after this question and the model's own answer to it (as a chat
    goes on); the image stays in the first turn."""
    rng = random.Random(seed)
    jobs = [(f"{record['id']}:{index}", record, kind, question, expected)
            for record in records for index, (kind, question, expected) in enumerate(questions(record["things"], rng))]
    by_image: dict[str, list] = {}
    for job in jobs:
        by_image.setdefault(job[1]["image"], []).append(job)
    with ResultLog(answers_path) as log:
        for entry in log.entries.values():
            logged = entry["history"][0][0] if entry.get("history") else None
            if logged != opener:
                raise ValueError(f"{answers_path} holds answers to questions asked {asked(logged)}, this run asks them "
                                 f"{asked(opener)}: give each opener its own output folder")
        for image, image_jobs in tqdm(by_image.items(), desc="shapes: answering", unit="image", disable=not progress):
            todo = [job for job in image_jobs if job[0] not in log or log[job[0]].get("failed")]
            if not todo:
                continue
            try:
                history = ((opener, candidate.answer(opener, image_folder / image, max_new_tokens=48)),) if opener else ()
                answers = candidate.answer_many([job[3] for job in todo], image_folder / image, max_new_tokens=48,
                                                history=history)
            except ImageLoadError as error:  # counted wrong, tried again by the next run; the others go on
                logger.warning("%s: %s; its questions count as failed", image, error)
                for item_id, record, kind, question, expected in todo:
                    log.add({"id": item_id, "image": image, "kind": kind, "question": question, "expected": expected,
                             "answer": None, "right": False, "failed": True, "error": str(error),
                             **({"history": [[opener, None]]} if opener else {})})
                continue
            for (item_id, record, kind, question, expected), answer in zip(todo, answers):
                log.add({"id": item_id, "image": image, "kind": kind, "question": question, "expected": expected,
                         "answer": answer, "right": judge(kind, answer, expected),
                         **({"history": [list(turn) for turn in history]} if history else {})})
        answered = [log[item_id] for item_id, *_ in jobs]
    scores, outcomes = {kind: [0, 0] for kind in KINDS}, dict.fromkeys(POSITION_OUTCOMES, 0)
    for entry, (_, record, *_) in zip(answered, jobs):
        scores[entry["kind"]][0] += entry["right"]
        scores[entry["kind"]][1] += 1
        if entry["kind"] == "position" and not entry.get("failed"):
            outcomes[position_outcome(entry["answer"], entry["expected"], record["things"])] += 1
    return {"accuracy": {kind: right / total if total else 0.0 for kind, (right, total) in scores.items()},
            "counts": {kind: total for kind, (_, total) in scores.items()},
            "position_outcomes": outcomes,
            "failed": sum(bool(entry.get("failed")) for entry in answered),
            "opener": opener,
            "samples": [entry for entry in answered[:40]]}


def asked(opener: str | None) -> str:
    return f"after \"{opener}\"" if opener else "first"


def load_split(path: Path) -> list[dict]:
    records = []
    for where, record in read_jsonl_objects(path):
        if not isinstance(record.get("things"), list) or "image" not in record:
            raise ValueError(f"{where}: not a shapes-world record (needs 'image' and 'things')")
        records.append(record)
    return records


def shapes_report(result: dict, model: str) -> str:
    rows = [[kind, f"{100 * result['accuracy'][kind]:.1f}%", result["counts"][kind]] for kind in KINDS]
    asked = (f"Every question asked as a follow-up, after \"{result['opener']}\" and the model's own answer.\n\n"
             if result.get("opener") else "")
    failed = (f"{result['failed']} questions failed: their image could not be read (counted wrong).\n\n"
              if result.get("failed") else "")
    return (f"# Shapes world: {model}\n\n" + asked + failed + table(["question", "accuracy", "questions"], rows) + "\n\n"
            + position_outcomes_sentence(result["position_outcomes"]) + "\n")
