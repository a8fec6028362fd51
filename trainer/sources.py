"""Where training records come from, by position: LLaVA JSON/JSONL files, or Hugging Face `datasets` (a folder
saved with `save_to_disk`, parquet files, a hub id).

Nothing holds all records in memory: a JSON file is read once to index where each record starts and ends, and a
record is parsed again only when asked for; a `datasets` dataset is memory-mapped Arrow. That one pass also checks
every record (a malformed one stops the run before step 1, named) and counts what the sampler needs (images, text
characters, turns), so 665K records load in seconds and never have to be parsed all at once again.
"""

import bisect
import codecs
import glob
import json
import os
import re
from pathlib import Path

import numpy as np

from .data import DataError, Record, parse_record, parse_turns

CHUNK = 1 << 24  # bytes read at a time while indexing a JSON list
LARGEST_RECORD = 1 << 26  # characters: a record that does not parse within this many is malformed
_WHITESPACE = re.compile(r"[ \t\n\r]*")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")


class RecordSource:
    """A sequence of records by position, with per-record counts: `images`, `chars` (text), `turns`."""

    name: str
    images: np.ndarray
    chars: np.ndarray
    turns: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def _set_counts(self, counts: list):
        table = np.array(counts, dtype=np.int64).reshape(-1, 3)
        self.images, self.chars, self.turns = table[:, 0].astype(np.int32), table[:, 1], table[:, 2].astype(np.int32)


class JsonSource(RecordSource):
    """A JSON list or JSONL file, indexed by byte spans; records are read back with one seek each."""

    def __init__(self, path: Path, seed: int):
        self.name, self.path, self.seed = str(path), path, seed
        spans, counts = [], []
        scan = _scan_lines if path.suffix == ".jsonl" else _scan_list
        for index, (start, end, raw) in enumerate(scan(path)):
            record = parse_record(raw, f"{path}#{index}", seed)
            counts.append((len(record.images), sum(len(text) for _, text in record.conversations), len(record.conversations)))
            spans.append((start, end))
        self.spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
        self._set_counts(counts)
        self._file, self._pid = None, None

    def __getitem__(self, index: int) -> Record:
        if self._pid != os.getpid():  # a data loader worker (forked) needs its own file position
            self._file, self._pid = self.path.open("rb"), os.getpid()
        start, end = self.spans[index]
        self._file.seek(start)
        return parse_record(json.loads(self._file.read(end - start)), f"{self.path}#{index}", self.seed)

    def __getstate__(self):  # workers started by spawn open the file themselves
        return {**self.__dict__, "_file": None, "_pid": None}


def _scan_lines(path: Path):
    offset = 0
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
                yield offset, offset + len(line), raw
            offset += len(line)


def _scan_list(path: Path):
    """(start byte, end byte, record) for each element of a top-level JSON list, reading CHUNK bytes at a time:
    the C decoder parses one element at a time (`raw_decode`) and byte offsets are counted as text is consumed."""
    decoder = json.JSONDecoder()
    with path.open("rb") as file:
        reader = _ListReader(file)
        reader.skip_whitespace()
        if not reader.text.startswith("[", reader.position):
            raise DataError(f"{path}: expected a JSON list of records")
        reader.advance(reader.position + 1)
        reader.skip_whitespace()
        if reader.text.startswith("]", reader.position):
            return
        index = 0
        while True:
            while True:  # one element; read on while it may continue in the next chunk
                try:
                    raw, end = decoder.raw_decode(reader.text, reader.position)
                    if end < len(reader.text) or reader.eof:
                        break
                except json.JSONDecodeError as error:
                    # Not a record cut by the chunking when the file is read to its end, or a record would be huge.
                    if reader.eof or len(reader.text) - reader.position > LARGEST_RECORD:
                        raise DataError(f"{path}: record {index} (byte {reader.offset()}) is not valid JSON ({error.msg})") from error
                reader.read_more()
            start = reader.offset()
            reader.advance(end)
            yield start, reader.offset(), raw
            reader.skip_whitespace()
            following = reader.text[reader.position:reader.position + 1]
            if following == "]":
                return
            if following != ",":
                raise DataError(f"{path}: expected ',' or ']' after record {index} (byte {reader.offset()})"
                                if following else f"{path}: ends inside the list, after record {index}")
            reader.advance(reader.position + 1)
            reader.skip_whitespace()
            index += 1


class _ListReader:
    """Text of a file read in chunks: `text[position:]` is what is left to parse; `offset()` is its byte offset."""

    def __init__(self, file):
        self.file, self.utf8 = file, codecs.getincrementaldecoder("utf-8")()
        self.text, self.position, self.eof = "", 0, False
        bom = file.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8  # as some Windows editors save JSON
        file.seek(len(codecs.BOM_UTF8) if bom else 0)
        self.base, self.consumed = file.tell(), 0  # byte offset of text[0]; bytes of text[:position]

    def offset(self) -> int:
        return self.base + self.consumed

    def advance(self, position: int):
        piece = self.text[self.position:position]
        self.consumed += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
        self.position = position

    def read_more(self):
        """Drops the consumed text and appends the next chunk."""
        self.base, self.consumed = self.base + self.consumed, 0
        chunk = self.file.read(CHUNK)
        self.eof = not chunk
        self.text, self.position = self.text[self.position:] + self.utf8.decode(chunk, final=self.eof), 0

    def skip_whitespace(self):
        while True:
            self.advance(_WHITESPACE.match(self.text, self.position).end())
            if self.position < len(self.text) or self.eof:
                return
            self.read_more()


class ArrowSource(RecordSource):
    """A `datasets.Dataset` (memory-mapped Arrow) with LLaVA columns: `id`, `image` (path, bytes, an `Image`
    feature, or a list of them), `conversations` (or `caption`). Images stay undecoded until a record is used."""

    def __init__(self, dataset, name: str, seed: int):
        self.name, self.seed = name, seed
        columns = set(dataset.column_names)
        if "id" not in columns or not columns & {"conversations", "caption"}:
            raise DataError(f"{name}: needs the columns 'id' and 'conversations' (or 'caption'), has {dataset.column_names}")
        self.dataset = _undecoded(dataset)
        image_counts = _image_counts(self.dataset)
        text = self.dataset.select_columns([column for column in ("id", "conversations", "caption") if column in dataset.column_names])
        counts = []
        for start in range(0, len(text), 1000):
            batch = text[start:start + 1000]
            for offset, row in enumerate(dict(zip(batch, values)) for values in zip(*batch.values())):
                index = start + offset
                where, rid = f"{name}#{index}", str(row.get("id"))
                if row.get("id") is None:
                    raise DataError(f"{where}: a record needs an 'id'")
                turns = parse_turns(row, where, rid, seed, bool(image_counts[index]))
                counts.append((int(image_counts[index]), sum(len(value) for _, value in turns), len(turns)))
        self._set_counts(counts)

    def __getitem__(self, index: int) -> Record:
        return parse_record(self.dataset[int(index)], f"{self.name}#{index}", self.seed)


def _undecoded(dataset):
    """Image features read as {"bytes", "path"}: decoding is the data loader's work, record by record."""
    import datasets

    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image):
        return dataset.cast_column("image", datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList)) and isinstance(inner, datasets.Image):
        return dataset.cast_column("image", type(feature)(datasets.Image(decode=False)))
    return dataset


def _image_counts(dataset) -> np.ndarray:
    """Images per row, from the Arrow column itself (no image bytes are copied)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "image" not in dataset.column_names:
        return np.zeros(len(dataset), dtype=np.int32)
    column = dataset.data.column("image")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        counts = pc.fill_null(pc.list_value_length(column), 0)
    else:
        counts = pc.cast(pc.is_valid(column), pa.int32())
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):  # "" means no image, as in JSON
            counts = pc.if_else(pc.equal(pc.fill_null(column, ""), ""), 0, counts)
    return counts.to_numpy(zero_copy_only=False).astype(np.int32)


class Records:
    """Several sources as one sequence; counts concatenated. A record is known by its position."""

    def __init__(self, sources: list[RecordSource]):
        self.sources = sources
        self.starts = np.cumsum([0] + [len(source) for source in sources])
        self.images = np.concatenate([source.images for source in sources]) if sources else np.zeros(0, np.int32)
        self.chars = np.concatenate([source.chars for source in sources]) if sources else np.zeros(0, np.int64)
        self.turns = np.concatenate([source.turns for source in sources]) if sources else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(index)
        number = bisect.bisect_right(self.starts, index) - 1
        return self.sources[number][int(index - self.starts[number])]

    def __iter__(self):
        return (self[index] for index in range(len(self)))


def load_records(paths: list[str], seed: int) -> Records:
    """`--data`: JSON/JSONL files, `datasets` folders (save_to_disk), parquet files, folders or globs, hub ids
    (`owner/name` or `owner/name:split`). Each source must hold records: an empty one is refused at once."""
    sources = []
    for path in paths:
        source = open_source(str(path), seed)
        if not len(source):
            raise DataError(f"{path}: holds no records")
        sources.append(source)
    if not sources:
        raise DataError("--data names no data")
    return Records(sources)


def open_source(path: str, seed: int) -> RecordSource:
    local = Path(path)
    if local.suffix in (".json", ".jsonl"):
        if not local.is_file():
            raise DataError(f"{path}: no such data file")
        return JsonSource(local, seed)
    if local.suffix == ".parquet" or any(character in path for character in "*?[") or (local.is_dir() and any(local.glob("**/*.parquet"))
                                                                and not (local / "state.json").exists()
                                                                and not (local / "dataset_dict.json").exists()):
        return ArrowSource(_load_parquet(path), path, seed)
    if local.is_dir():
        return ArrowSource(_load_saved(local), path, seed)
    if not local.exists() and HUB_ID.fullmatch(path):
        return ArrowSource(_load_hub(path), path, seed)
    raise DataError(f"{path}: not a data file (.json, .jsonl, .parquet), a dataset folder, or a hub id (owner/name[:split])")


def _load_parquet(path: str):
    import datasets

    local = Path(path)
    files = sorted(str(file) for file in local.glob("**/*.parquet")) if local.is_dir() else sorted(glob.glob(path))
    if not files:
        raise DataError(f"{path}: no parquet files")
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train")
    except Exception as error:  # pyarrow and datasets raise many kinds for a damaged file
        raise DataError(f"{path}: cannot read the parquet files ({type(error).__name__}: {error})") from error


def _load_saved(folder: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise DataError(f"{folder}: not a dataset saved with save_to_disk, and holds no parquet files") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{folder}: a dataset dict without a 'train' split (has {sorted(loaded)}); name the split's folder")
        loaded = loaded["train"]
    return loaded


def _load_hub(name: str):
    import datasets

    repo, _, split = name.partition(":")
    try:
        return datasets.load_dataset(repo, split=split or "train")
    except Exception as error:  # no network, no such dataset, no such split: say which
        raise DataError(f"{name}: cannot load the hub dataset {repo!r}, split {split or 'train'!r} ({type(error).__name__}: {error})") from error
