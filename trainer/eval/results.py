"""A resumable JSONL of results keyed by id: each finished item is one line, flushed as written, so a rerun after a
crash skips what is done (a last line cut short by the crash is dropped and done again)."""

import json
from pathlib import Path

from trainer.datagen.progress import read_jsonl_tolerant


def read_jsonl_objects(path: Path) -> list[tuple[str, dict]]:
    """An input JSONL as ("file:line", object) pairs; a line that is not a JSON object is an error naming its place."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            rows.append((f"{path}:{number}", row))
    return rows


class ResultLog:
    def __init__(self, path: Path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Lines without the key are from another layout of the file (an older version): they are not results of this one.
        self.entries = {entry[key]: entry for entry in read_jsonl_tolerant(self.path) if key in entry}
        self._handle = None

    def __contains__(self, item_id) -> bool:
        return item_id in self.entries

    def __getitem__(self, item_id) -> dict:
        return self.entries[item_id]

    def add(self, entry: dict):
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.entries[entry[self.key]] = entry

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
