"""LLaVA-Bench style evaluation: a text-only model writes reference answers from the image's description, the
candidate answers from the image, and a judge model scores both 1-10. The relative score is
mean(candidate) / mean(reference) x 100, per category and overall.

The two answers are shown in a random order per question (seeded by the question id), and the scores are mapped
back, so a judge that favours the first (or second) answer cannot move the result. A judgement whose first line is
not two scores is asked for again (`parse_retries`), then counted as a failure and left out of the means."""

import asyncio
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tqdm.auto import tqdm

from trainer.datagen.openai_backend import FATAL_ERRORS, Usage, make_client

from .report import table
from .results import ResultLog, read_jsonl_objects

logger = logging.getLogger(__name__)
CATEGORIES = ("conversation", "detail", "complex")
DEFAULT_JUDGE = "gpt-4.1"

REFERENCE_SYSTEM = ("You are an AI visual assistant. You cannot see the image, but you are given a description of it "
                    "(captions, object boxes or a human's account). Answer the user's question about the image as if you "
                    "were looking at it: confidently, without mentioning the description.")
JUDGE_SYSTEM = "You are a careful and impartial judge of answers to questions about images."
JUDGE_INSTRUCTIONS = (
    "Two AI assistants answered the question above, which a user asked while looking at an image. You cannot see the "
    "image; the context above describes it. Rate how helpful, relevant, accurate and detailed each answer is, as one "
    "overall score from 1 to 10 per assistant, higher being better.\n"
    "On the first line write only the two scores, Assistant 1's and then Assistant 2's, separated by a space. From the "
    "second line on, explain your rating. Judge the content alone: the order in which the answers appear must not "
    "matter.")
SCORE_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[,;/ ]\s*(\d+(?:\.\d+)?)\s*$")


class JudgeParseError(ValueError):
    pass


def parse_scores(text: str) -> tuple[float, float]:
    """The two scores on the judgement's first non-empty line, each within 1-10."""
    first = next((line for line in (text or "").splitlines() if line.strip()), "")
    match = SCORE_LINE.match(first.replace("**", ""))
    if not match:
        raise JudgeParseError(f"the first line is not two scores: {first[:80]!r}")
    scores = float(match.group(1)), float(match.group(2))
    if not all(1 <= score <= 10 for score in scores):
        raise JudgeParseError(f"scores outside 1-10: {scores}")
    return scores


def judge_messages(context: str, question: str, first: str, second: str) -> list[dict]:
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{first}\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{second}\n[End of Assistant 2]\n\n[Instructions]\n{JUDGE_INSTRUCTIONS}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def reference_messages(context: str, question: str) -> list[dict]:
    return [{"role": "system", "content": REFERENCE_SYSTEM},
            {"role": "user", "content": f"Image description:\n{context}\n\nQuestion: {question}"}]


def reference_first(question_id, seed: int) -> bool:
    return random.Random(f"{seed}:{question_id}").random() < 0.5


@dataclass
class Question:
    question_id: str
    image: str | None
    text: str
    category: str
    context: str
    reference: str | None = None


def load_questions(path: Path, contexts: Path | None = None, references: Path | None = None) -> list[Question]:
    """LLaVA-Bench files: questions (question_id, image, text, category; optional context, reference), with context
    ({image, caption}) and reference answers ({question_id, text}) inline or in their own JSONL files."""

    context_by_image = {row.get("image"): row.get("caption") or row.get("context") for _, row in read_jsonl_objects(contexts)} if contexts else {}
    reference_by_id = {str(row["question_id"]): row["text"] for _, row in read_jsonl_objects(references)} if references else {}
    questions, seen = [], set()
    for where, row in read_jsonl_objects(path):
        missing = [key for key in ("question_id", "text", "category") if key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        question_id = str(row["question_id"])
        if question_id in seen:
            raise ValueError(f"{where}: question_id {question_id} appears twice")
        seen.add(question_id)
        if row["category"] not in CATEGORIES:
            raise ValueError(f"{where}: category {row['category']!r} is not one of {', '.join(CATEGORIES)}")
        context = row.get("context") or context_by_image.get(row.get("image"))
        if not context:
            raise ValueError(f"{where}: no context for image {row.get('image')!r} (give 'context' or a --context file)")
        if isinstance(context, list):
            context = "\n".join(map(str, context))
        questions.append(Question(question_id, row.get("image"), row["text"], row["category"], context,
                                  row.get("reference") or reference_by_id.get(question_id)))
    return questions


@dataclass
class JudgeSettings:
    judge_model: str = DEFAULT_JUDGE
    reference_model: str = DEFAULT_JUDGE
    api_key: str | None = None  # None: the openai client reads OPENAI_API_KEY
    base_url: str | None = None
    concurrency: int = 8
    parse_retries: int = 2
    max_retries: int = 8
    timeout: float = 120.0
    temperature: float = 0.2  # the paper's judge temperature
    seed: int = 0
    progress_bar: bool = True
    usage: Usage = field(default_factory=Usage)


async def _ask(client, model: str, messages: list[dict], temperature: float, usage: Usage) -> str:
    usage.calls += 1
    response = await client.chat.completions.create(model=model, messages=messages, temperature=temperature)
    if response.usage is not None:
        usage.prompt_tokens += response.usage.prompt_tokens or 0
        usage.completion_tokens += response.usage.completion_tokens or 0
    return (response.choices[0].message.content or "") if response.choices else ""


async def _gather(jobs, concurrency: int, description: str, progress: bool) -> None:
    """Run coroutine factories with bounded concurrency. A fatal error (bad key, unknown model) stops the run; a
    transport error that outlived the client's retries leaves that item undone (and logged) for the next run."""
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(jobs), desc=description, disable=not progress)

    async def one(job):
        async with semaphore:
            try:
                await job()
            except FATAL_ERRORS:
                raise
            except openai.APIError as error:
                logger.warning("%s: left for the next run after the client's retries: %s", description, error)
            bar.update()

    try:
        await asyncio.gather(*(one(job) for job in jobs))
    finally:
        bar.close()


async def write_references(questions: list[Question], log: ResultLog, settings: JudgeSettings, client) -> None:
    """Text-only reference answers for the questions that have none (the paper's text-only GPT-4 answers)."""

    def job(question):
        async def run():
            text = await _ask(client, settings.reference_model, reference_messages(question.context, question.text),
                              settings.temperature, settings.usage)
            if text.strip():
                log.add({"question_id": question.question_id, "text": text.strip(), "model": settings.reference_model})
        return run

    todo = [question for question in questions if question.reference is None and question.question_id not in log]
    await _gather([job(question) for question in todo], settings.concurrency, "references", settings.progress_bar)


async def write_reviews(questions: list[Question], references: dict, answers: dict, log: ResultLog,
                        settings: JudgeSettings, client) -> None:
    def job(question):
        async def run():
            reference, candidate = references[question.question_id], answers[question.question_id]
            flipped = not reference_first(question.question_id, settings.seed)
            first, second = (candidate, reference) if flipped else (reference, candidate)
            messages = judge_messages(question.context, question.text, first, second)
            errors = []
            for _ in range(settings.parse_retries + 1):
                text = await _ask(client, settings.judge_model, messages, settings.temperature, settings.usage)
                try:
                    scores = parse_scores(text)
                except JudgeParseError as error:
                    errors.append(str(error))
                    continue
                reference_score, candidate_score = (scores[1], scores[0]) if flipped else scores
                log.add({"question_id": question.question_id, "category": question.category,
                         "order": "candidate first" if flipped else "reference first",
                         "reference_score": reference_score, "candidate_score": candidate_score, "judgement": text,
                         "attempts": len(errors) + 1})
                return
            log.add({"question_id": question.question_id, "category": question.category, "failed": True,
                     "errors": errors, "attempts": len(errors)})
        return run

    todo = [question for question in questions if question.question_id not in log]
    await _gather([job(question) for question in todo], settings.concurrency, "judging", settings.progress_bar)


def relative_scores(reviews: list[dict]) -> dict:
    """Per category and overall: both means, the relative score, the number scored and the parse failures."""
    out = {}
    for name in (*CATEGORIES, "overall"):
        chosen = [review for review in reviews if name in ("overall", review["category"])]
        scored = [review for review in chosen if not review.get("failed")]
        if not chosen:
            continue
        reference = sum(r["reference_score"] for r in scored) / len(scored) if scored else None
        candidate = sum(r["candidate_score"] for r in scored) / len(scored) if scored else None
        out[name] = {"relative": 100 * candidate / reference if scored and reference else None,
                     "reference_mean": reference, "candidate_mean": candidate, "scored": len(scored),
                     "failed": len(chosen) - len(scored)}
    return out


def judge_report(scores: dict, candidate: str, settings: JudgeSettings) -> str:
    def number(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = [[name, number(s["relative"], 1), number(s["candidate_mean"]), number(s["reference_mean"]), s["scored"], s["failed"]]
            for name, s in scores.items()]
    return (f"# LLaVA-Bench style judged evaluation: {candidate}\n\n"
            f"Judge `{settings.judge_model}` (temperature {settings.temperature}); references by `{settings.reference_model}` "
            f"where the questions had none. Relative score = candidate mean / reference mean x 100.\n\n"
            + table(["category", "relative score", "candidate mean", "reference mean", "scored", "parse failures"], rows) + "\n")


def run_judge(questions: list[Question], answer, output: Path, settings: JudgeSettings, candidate_name: str) -> dict:
    """`answer(question) -> str` is the candidate. Writes references.jsonl, answers.jsonl, reviews.jsonl, scores.json
    and report.md under `output`; each JSONL resumes where an interrupted run stopped."""
    output.mkdir(parents=True, exist_ok=True)

    async def online(step):
        client = make_client(settings.api_key, settings.base_url, settings.max_retries, settings.timeout, settings.usage)
        try:
            await step(client)
        finally:
            await client.close()

    with ResultLog(output / "references.jsonl", key="question_id") as log:
        if any(question.reference is None and question.question_id not in log for question in questions):
            asyncio.run(online(lambda client: write_references(questions, log, settings, client)))
        references = {q.question_id: q.reference if q.reference is not None else log.entries.get(q.question_id, {}).get("text")
                      for q in questions}
    missing = [question_id for question_id, text in references.items() if not text]
    if missing:
        raise RuntimeError(f"no reference answer for {len(missing)} questions (e.g. {missing[:3]}); run again to retry")

    with ResultLog(output / "answers.jsonl", key="question_id") as log:
        for question in tqdm(questions, desc="candidate answers", disable=not settings.progress_bar):
            if question.question_id not in log:
                log.add({"question_id": question.question_id, "text": answer(question), "model": candidate_name})
        answers = {question.question_id: log[question.question_id]["text"] for question in questions}

    with ResultLog(output / "reviews.jsonl", key="question_id") as log:
        asyncio.run(online(lambda client: write_reviews(questions, references, answers, log, settings, client)))
        reviews = [log[question.question_id] for question in questions if question.question_id in log]
    if len(reviews) < len(questions):
        raise RuntimeError(f"{len(questions) - len(reviews)} questions could not be judged (server errors after retries); "
                           "run again to judge only those")
    scores = relative_scores(reviews)
    (output / "scores.json").write_text(json.dumps(scores, indent=1))
    (output / "report.md").write_text(judge_report(scores, candidate_name, settings))
    return scores


__all__ = ["CATEGORIES", "JudgeSettings", "Question", "load_questions", "parse_scores", "relative_scores",
           "run_judge"]
