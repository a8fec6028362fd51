"""LLaVA-Bench style evaluation: a text-only model writes reference answers from the image's description, the
candidate answers from the image, and a judge model scores both 1-10. Scores are summarised as the original's
`summarize_gpt_review.py` does: per category and overall, the mean reference and candidate scores (3 decimals) and
the relative score, mean(candidate) / mean(reference) x 100 (1 decimal).

Answer order (`order`): the original always shows the reference as Assistant 1 (`reference-first`, the default: scores
comparable with published ones); `candidate-first` the other way; `both` asks once each way and averages, which gives
each side any first-position bias once. A judgement whose first line is not two scores is asked for again
(`parse_retries`), then counted as a failure and left out of the means. A question whose image cannot be read is
recorded as unanswered, counted, and left out; a rerun tries it again."""

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tqdm.auto import tqdm

from llava_plugin import ImageLoadError
from trainer.datagen.openai_backend import FATAL_ERRORS, Usage, make_client

from .bench_files import CATEGORIES, Question, load_questions
from .options import DEFAULT_JUDGE, ORDERS
from .report import table
from .results import ResultLog
from .review import JudgeParseError, Wording, parse_scores

logger = logging.getLogger(__name__)

REFERENCE_SYSTEM = ("You are an AI visual assistant. You cannot see the image, but you are given a description of it "
                    "(captions, object boxes or a human's account). Answer the user's question about the image as if you "
                    "were looking at it: confidently, without mentioning the description.")


def reference_messages(context: str, question: str) -> list[dict]:
    return [{"role": "system", "content": REFERENCE_SYSTEM},
            {"role": "user", "content": f"Image description:\n{context}\n\nQuestion: {question}"}]


def orders_asked(order: str) -> tuple[str, ...]:
    return ("reference-first", "candidate-first") if order == "both" else (order,)


def review_id(question_id: str, order: str) -> str:
    return f"{question_id}|{order}"


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
    judge_max_tokens: int = 1024  # the original's review scripts' limit
    order: str = "reference-first"
    wording: Wording = field(default_factory=Wording)
    progress_bar: bool = True
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")


async def _ask(client, model: str, messages: list[dict], temperature: float, usage: Usage, max_tokens: int | None = None) -> str:
    usage.calls += 1
    options = {"max_tokens": max_tokens} if max_tokens else {}
    response = await client.chat.completions.create(model=model, messages=messages, temperature=temperature, **options)
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
    """One judgement per (answered question, order asked), each a line of the log keyed by `review_id`."""

    def job(question, order):
        async def run():
            reference, candidate = references[question.question_id], answers[question.question_id]
            flipped = order == "candidate-first"
            first, second = (candidate, reference) if flipped else (reference, candidate)
            messages = settings.wording.messages(question.category, question.context_kind, question.context,
                                                 question.text, first, second)
            entry = {"review_id": review_id(question.question_id, order), "question_id": question.question_id,
                     "category": question.category, "order": order}
            errors = []
            for _ in range(settings.parse_retries + 1):
                text = await _ask(client, settings.judge_model, messages, settings.temperature, settings.usage,
                                  settings.judge_max_tokens)
                try:
                    scores = parse_scores(text)
                except JudgeParseError as error:
                    errors.append(str(error))
                    continue
                reference_score, candidate_score = (scores[1], scores[0]) if flipped else scores
                log.add(entry | {"reference_score": reference_score, "candidate_score": candidate_score,
                                 "judgement": text, "attempts": len(errors) + 1})
                return
            log.add(entry | {"failed": True, "errors": errors, "attempts": len(errors)})
        return run

    todo = [(question, order) for question in questions if question.question_id in answers
            for order in orders_asked(settings.order) if review_id(question.question_id, order) not in log]
    await _gather([job(*item) for item in todo], settings.concurrency, "judging", settings.progress_bar)


def question_scores(question: Question, reviews: dict, order: str) -> dict:
    """A question's (reference, candidate) scores: its judgement, or the mean of both orders' under `both`."""
    entries = [reviews[review_id(question.question_id, asked)] for asked in orders_asked(order)]
    if any(entry.get("failed") for entry in entries):
        return {"category": question.category, "failed": True}
    return {"category": question.category,
            "reference_score": sum(entry["reference_score"] for entry in entries) / len(entries),
            "candidate_score": sum(entry["candidate_score"] for entry in entries) / len(entries)}


def relative_scores(scored: list[dict]) -> dict:
    """Per category and overall, as summarize_gpt_review.py reports them: both means rounded to 3 decimals, and the
    relative score from those means, rounded to 1 decimal; with the number scored, failed and unanswered."""
    out = {}
    for name in (*CATEGORIES, "overall"):
        chosen = [item for item in scored if name in ("overall", item["category"])]
        if not chosen:
            continue
        judged = [item for item in chosen if not item.get("failed") and not item.get("unanswered")]
        reference = round(sum(i["reference_score"] for i in judged) / len(judged), 3) if judged else None
        candidate = round(sum(i["candidate_score"] for i in judged) / len(judged), 3) if judged else None
        out[name] = {"relative": round(candidate / reference * 100, 1) if judged and reference else None,
                     "reference_mean": reference, "candidate_mean": candidate, "scored": len(judged),
                     "failed": sum(bool(item.get("failed")) for item in chosen),
                     "unanswered": sum(bool(item.get("unanswered")) for item in chosen)}
    return out


def judge_report(scores: dict, candidate: str, settings: JudgeSettings) -> str:
    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = [[name, number(s["relative"], 1), number(s["candidate_mean"]), number(s["reference_mean"]), s["scored"],
             s["failed"], s["unanswered"]] for name, s in scores.items()]
    return (f"# LLaVA-Bench style judged evaluation: {candidate}\n\n"
            f"Judge `{settings.judge_model}` (temperature {settings.temperature}), {settings.wording.describe()}; answer "
            f"order {settings.order}; references by `{settings.reference_model}` where the questions had none. Relative "
            f"score = candidate mean / reference mean x 100, as summarize_gpt_review.py computes it.\n\n"
            + table(["category", "relative score", "candidate mean", "reference mean", "scored", "parse failures",
                     "unanswered (image unreadable)"], rows) + "\n")


def write_answers(questions: list[Question], answer, path: Path, candidate_name: str, progress: bool) -> dict:
    """question_id -> the candidate's answer; a question whose image cannot be read is logged as failed (and tried
    again by the next run) instead of stopping the run."""
    with ResultLog(path, key="question_id") as log:
        for question in tqdm(questions, desc="candidate answers", disable=not progress):
            if question.question_id in log and not log[question.question_id].get("failed"):
                continue
            try:
                text = answer(question)
            except ImageLoadError as error:
                logger.warning("question %s: %s; recorded as unanswered", question.question_id, error)
                log.add({"question_id": question.question_id, "failed": True, "error": str(error), "model": candidate_name})
                continue
            log.add({"question_id": question.question_id, "text": text, "model": candidate_name})
        return {q.question_id: log[q.question_id]["text"] for q in questions if not log[q.question_id].get("failed")}


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

    answers = write_answers(questions, answer, output / "answers.jsonl", candidate_name, settings.progress_bar)

    with ResultLog(output / "reviews.jsonl", key="review_id") as log:
        asyncio.run(online(lambda client: write_reviews(questions, references, answers, log, settings, client)))
        reviews = dict(log.entries)
    answered = [question for question in questions if question.question_id in answers]
    undone = [q for q in answered if any(review_id(q.question_id, o) not in reviews for o in orders_asked(settings.order))]
    if undone:
        raise RuntimeError(f"{len(undone)} questions could not be judged (server errors after retries); "
                           "run again to judge only those")
    scored = [question_scores(q, reviews, settings.order) if q.question_id in answers
              else {"category": q.category, "unanswered": True} for q in questions]
    scores = relative_scores(scored)
    (output / "scores.json").write_text(json.dumps(scores, indent=1))
    (output / "report.md").write_text(judge_report(scores, candidate_name, settings))
    return scores


__all__ = ["CATEGORIES", "ORDERS", "JudgeSettings", "Question", "load_questions", "parse_scores", "relative_scores",
           "run_judge"]
