"""Data generation as a whole: (image, kind) jobs, bounded concurrency, parse retries, resumable progress, the
final LLaVA JSON written atomically, and a summary."""

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tqdm.auto import tqdm

from .annotations import ImageAnnotation, load_annotations
from .offline import draft_offline
from .openai_backend import DEFAULT_MODEL, FATAL_ERRORS, OpenAIDrafter, Usage, estimated_cost
from .progress import ProgressLog, write_json_atomic
from .prompts import KINDS
from .records import job_random, record_id, to_record
from .responses import ResponseError, parse_response
from .prompt_sets import BUILTIN, load_prompt_folder

logger = logging.getLogger(__name__)
BACKENDS = ("offline", "openai")


@dataclass
class DatagenConfig:
    inputs: list[str]
    output: str
    kinds: tuple[str, ...] = KINDS
    backend: str = "offline"
    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key: str | None = None  # None: the openai client reads OPENAI_API_KEY
    # False for a visitor's request (the app's data tab): nothing of the server's environment (OPENAI_API_KEY,
    # OPENAI_ORG_ID, OPENAI_PROJECT_ID, OPENAI_BASE_URL) goes into it; the key and base URL must be given.
    credentials_from_environment: bool = True
    concurrency: int = 16
    limit: int | None = None
    seed: int = 0
    parse_retries: int = 2
    max_retries: int = 8
    timeout: float = 120.0
    temperature: float = 0.7
    retry_rejects: bool = False
    progress_bar: bool = True
    prompts: str | None = None  # the original's prompt folder (prompt_sets.py); None: the built-in prompts

    def __post_init__(self):
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.prompts and self.backend != "openai":
            raise ValueError("--prompts is for the openai backend: the offline drafter uses no prompts")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")


@dataclass
class Summary:
    jobs: int = 0
    already_done: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0  # transport errors after the client's retries: not marked done, a rerun tries again
    parse_retries: int = 0
    usage: Usage = field(default_factory=Usage)
    cost: float | None = None
    output_records: int = 0

    def lines(self) -> list[str]:
        cost = "unknown (no price for this model)" if self.cost is None else f"${self.cost:.4f}"
        return [
            f"jobs {self.jobs} (already done {self.already_done}): accepted {self.accepted}, rejected {self.rejected}, "
            f"failed {self.failed}",
            f"requests {self.usage.requests}, retries {self.usage.retries} (transport) + {self.parse_retries} (unparsable)",
            f"tokens {self.usage.prompt_tokens} in, {self.usage.completion_tokens} out; estimated cost {cost}",
            f"records in the output: {self.output_records}",
        ]


class OfflineDrafter:
    def __init__(self, seed: int):
        self.seed, self.usage = seed, Usage()

    async def draft(self, kind: str, annotation: ImageAnnotation, attempt: int) -> str:
        return draft_offline(annotation, kind, job_random(self.seed, annotation.id, kind, f"draft{attempt}"))

    async def close(self):
        pass


def make_drafter(config: DatagenConfig):
    if config.backend == "offline":
        return OfflineDrafter(config.seed)
    return openai_drafter(config)


def openai_drafter(config: DatagenConfig) -> OpenAIDrafter:
    prompts = load_prompt_folder(config.prompts, config.kinds) if config.prompts else BUILTIN
    return OpenAIDrafter(config.model, config.api_key, config.base_url, config.max_retries, config.timeout, config.temperature,
                         prompts, config.credentials_from_environment)


async def draft_job(drafter, annotation: ImageAnnotation, kind: str, config: DatagenConfig, log: ProgressLog, summary: Summary):
    reason, text = "", ""
    for attempt in range(config.parse_retries + 1):
        summary.parse_retries += attempt > 0
        text = await drafter.draft(kind, annotation, attempt)
        try:
            turns = parse_response(kind, text)
        except ResponseError as error:
            reason = str(error)
            continue
        log.accept(to_record(annotation, kind, turns, config.seed))
        summary.accepted += 1
        return
    log.reject(record_id(annotation.id, kind), reason, text)
    summary.rejected += 1


async def run_jobs(jobs, drafter, config: DatagenConfig, log: ProgressLog, summary: Summary):
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    bar = tqdm(total=len(jobs), desc="drafting", unit="record", disable=not config.progress_bar)

    async def worker():
        while not queue.empty():
            annotation, kind = queue.get_nowait()
            try:
                await draft_job(drafter, annotation, kind, config, log, summary)
            except FATAL_ERRORS:
                raise
            except openai.APIError as error:  # the client already retried: leave the job for the next run
                summary.failed += 1
                logger.warning("%s: request failed after retries (%s: %s); a rerun tries it again",
                               record_id(annotation.id, kind), type(error).__name__, error)
            bar.update()

    try:
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, max(len(jobs), 1)))))
    finally:
        bar.close()


def pending_jobs(annotations: list[ImageAnnotation], config: DatagenConfig, log: ProgressLog, summary: Summary):
    jobs = []
    for annotation in annotations[: config.limit]:
        for kind in config.kinds:
            summary.jobs += 1
            if log.done(record_id(annotation.id, kind), config.retry_rejects):
                summary.already_done += 1
            else:
                jobs.append((annotation, kind))
    return jobs


def write_output(annotations: list[ImageAnnotation], config: DatagenConfig, log: ProgressLog) -> int:
    """The LLaVA JSON, in input order, from everything accepted so far (this run and earlier ones)."""
    ordered = [log.records[job_id] for annotation in annotations[: config.limit] for kind in config.kinds
               if (job_id := record_id(annotation.id, kind)) in log.records]
    write_json_atomic(Path(config.output), ordered)
    return len(ordered)


async def run_datagen(config: DatagenConfig, annotations: list[ImageAnnotation] | None = None) -> Summary:
    annotations = annotations if annotations is not None else load_annotations(config.inputs)
    Path(config.output).parent.mkdir(parents=True, exist_ok=True)
    log, summary = ProgressLog(Path(config.output)), Summary()
    drafter = make_drafter(config)
    try:
        await run_jobs(pending_jobs(annotations, config, log, summary), drafter, config, log, summary)
    finally:
        log.close()
        await drafter.close()
    summary.usage = drafter.usage
    summary.cost = estimated_cost(config.model, drafter.usage) if config.backend == "openai" else 0.0
    summary.output_records = write_output(annotations, config, log)
    return summary


def generate(config: DatagenConfig) -> Summary:
    """Synchronous entry point (the CLI's)."""
    return asyncio.run(run_datagen(config))


def draft_records(annotation: ImageAnnotation, kinds=KINDS, backend: str = "offline", seed: int = 0, **options) -> tuple[list[dict], list[dict]]:
    """One image, drafted in memory (the app's data tab): (records, rejects with reasons). Nothing is written."""
    config = DatagenConfig(inputs=[], output="", kinds=tuple(kinds), backend=backend, seed=seed, progress_bar=False, **options)

    async def run():
        drafter, records, rejects = make_drafter(config), [], []
        try:
            for kind in config.kinds:
                memory = _MemoryLog()
                await draft_job(drafter, annotation, kind, config, memory, Summary())
                records += memory.accepted
                rejects += memory.rejected
        finally:
            await drafter.close()
        return records, rejects

    return asyncio.run(run())


class _MemoryLog:
    def __init__(self):
        self.accepted, self.rejected = [], []

    def accept(self, record):
        self.accepted.append(record)

    def reject(self, job_id, reason, response):
        self.rejected.append({"id": job_id, "reason": reason, "response": response})


async def run_batch(config: DatagenConfig) -> tuple[str, Summary]:
    """--batch-api: submits the pending jobs the first time; later calls collect the results once the batch is done."""
    from . import batch_api

    annotations = load_annotations(config.inputs)
    Path(config.output).parent.mkdir(parents=True, exist_ok=True)
    log, summary = ProgressLog(Path(config.output)), Summary()
    drafter = openai_drafter(config)
    try:
        jobs = pending_jobs(annotations, config, log, summary)
        if not batch_api.state_path(config.output).exists():
            if not jobs:
                return "nothing to submit: every job is done", summary
            state = await batch_api.submit(drafter, jobs, config.output)
            return f"submitted batch {state['batch_id']} with {len(jobs)} requests; run the same command to collect it", summary
        by_id = {record_id(annotation.id, kind): (annotation, kind) for annotation, kind in jobs}
        status = await batch_api.collect(drafter, by_id, config.output, log, config.seed, summary)
    finally:
        log.close()
        await drafter.close()
    if status not in batch_api.FINISHED:
        return f"batch is {status}; run the same command later to collect it", summary
    summary.usage = drafter.usage
    summary.output_records = write_output(annotations, config, log)
    if status != "completed":
        return f"the batch ended {status}: collected what it returned; run again to submit the rest", summary
    return "collected the batch", summary
