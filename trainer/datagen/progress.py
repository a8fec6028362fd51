"""The progress log: one JSON line per finished job, flushed as it is written, so a rerun after a crash or
Ctrl-C skips exactly what is done. Accepted records go to PROGRESS, unusable responses to REJECTS with the reason."""

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """All complete lines; a last line cut short by a crash is dropped (and said), then trimmed from the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines, entries, good_bytes = raw.split(b"\n"), [], 0
    for index, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1 or all(not rest.strip() for rest in lines[index + 1:]):
                logger.warning("%s: dropping an incomplete last line left by an interrupted run; that job runs again", path)
                with open(path, "r+b") as handle:
                    handle.truncate(good_bytes)
                break
            raise ValueError(f"{path}: line {index + 1} is not valid JSON; the progress log is damaged") from None
        good_bytes += len(line) + 1
    return entries


class ProgressLog:
    def __init__(self, output: Path):
        self.progress_path = output.with_name(output.name + ".progress.jsonl")
        self.rejects_path = output.with_name(output.name + ".rejects.jsonl")
        self.records = {entry["id"]: entry for entry in read_jsonl_tolerant(self.progress_path)}
        self.rejects = {entry["id"]: entry for entry in read_jsonl_tolerant(self.rejects_path)}
        self._handles = {}

    def done(self, job_id: str, retry_rejects: bool = False) -> bool:
        return job_id in self.records or (job_id in self.rejects and not retry_rejects)

    def _append(self, path: Path, entry: dict):
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open(path, "a", encoding="utf-8")
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()

    def accept(self, record: dict):
        self.records[record["id"]] = record
        self.rejects.pop(record["id"], None)
        self._append(self.progress_path, record)

    def reject(self, job_id: str, reason: str, response: str):
        entry = {"id": job_id, "reason": reason, "response": response}
        self.rejects[job_id] = entry
        self._append(self.rejects_path, entry)

    def close(self):
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def write_json_atomic(path: Path, data) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
