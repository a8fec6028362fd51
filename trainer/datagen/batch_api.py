"""Large jobs through the OpenAI Batch API (half the price, results within 24 h): submit once, collect later.

State lives next to the output (`OUT.batch.json`), so the same command submits the first time and collects after.
Collected responses go through the same parser, progress log and rejects file as live drafting.
"""

import io
import json
from pathlib import Path

from .annotations import ImageAnnotation
from .openai_backend import OpenAIDrafter, estimated_cost
from .progress import ProgressLog
from .records import record_id, to_record
from .responses import ResponseError, parse_response

ENDPOINT = "/v1/chat/completions"
FINISHED = ("completed", "failed", "expired", "cancelled")  # the Batch API's terminal statuses


def state_path(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".batch.json")


async def submit(drafter: OpenAIDrafter, jobs: list[tuple[ImageAnnotation, str]], output: str) -> dict:
    lines = [
        json.dumps({"custom_id": record_id(annotation.id, kind), "method": "POST", "url": ENDPOINT,
                    "body": drafter.request_body(kind, annotation)})
        for annotation, kind in jobs
    ]
    upload = await drafter.client.files.create(file=("requests.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = await drafter.client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h")
    state = {"batch_id": batch.id, "input_file_id": upload.id, "jobs": len(jobs)}
    state_path(output).write_text(json.dumps(state))
    return state


async def collect(drafter: OpenAIDrafter, annotations: dict[str, tuple[ImageAnnotation, str]], output: str, log: ProgressLog,
                  seed: int, summary) -> str:
    """Writes what a finished batch returned; returns the batch status ('completed' once collected)."""
    state = json.loads(state_path(output).read_text())
    batch = await drafter.client.batches.retrieve(state["batch_id"])
    if batch.status not in FINISHED:
        return batch.status
    if getattr(batch, "error_file_id", None):  # requests the service gave up on: not done, a later run drafts them
        errors = await drafter.client.files.content(batch.error_file_id)
        summary.failed += sum(1 for line in errors.text.splitlines() if line.strip())
    lines = (await drafter.client.files.content(batch.output_file_id)).text.splitlines() if batch.output_file_id else []
    for line in lines:
        if not line.strip():
            continue
        result = json.loads(line)
        job = annotations.get(result["custom_id"])
        body = (result.get("response") or {}).get("body") or {}
        if job is None or log.done(result["custom_id"]):
            continue
        if not body.get("choices"):
            summary.failed += 1  # not marked done: a live rerun drafts it
            continue
        annotation, kind = job
        usage = body.get("usage") or {}
        drafter.usage.prompt_tokens += usage.get("prompt_tokens", 0)
        drafter.usage.completion_tokens += usage.get("completion_tokens", 0)
        text = body["choices"][0]["message"].get("content") or ""
        try:
            log.accept(to_record(annotation, kind, parse_response(kind, text), seed))
            summary.accepted += 1
        except ResponseError as error:
            log.reject(result["custom_id"], str(error), text)
            summary.rejected += 1
    summary.cost = estimated_cost(drafter.model, drafter.usage, batch=True)
    state_path(output).unlink()  # finished, whatever the outcome: the next run submits what is still missing
    return batch.status
