"""The dataset the loop reads: records encoded on the fly; a record that turns out unusable (unreadable image, too
long) comes back as a skip marker with the reason, never as an exception that would end a long run."""

from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from .data import DataError, ImageLoadError, encode, image_key
from .feature_cache import FeatureCache

# Up to EXACT_LENGTHS records, lengths are counted exactly; beyond, RATE_SAMPLE of them set tokens per character.
EXACT_LENGTHS, RATE_SAMPLE = 10_000, 2_000


class LlavaDataset(Dataset):
    """With a feature cache, a record's tokens are rendered once and kept (int32 ids and an answer mask, 5 bytes a
    token): rendering the chat template took a third of a stage-2 step of the shapes model, every epoch again."""

    def __init__(self, records, processor, seed: int, max_length: int, image_folder: str,
                 strict: bool = False, feature_cache: FeatureCache | None = None, template: str = "chat", placement: str = "front"):
        self.records, self.processor, self.seed = records, processor, seed
        self.max_length, self.image_folder, self.strict, self.feature_cache = max_length, image_folder, strict, feature_cache
        self.template, self.placement = template, placement
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor] | str] = {}  # index -> (ids, answer mask) or why unusable

    def __len__(self) -> int:
        return len(self.records)

    def _encode(self, record, load_pixels: bool = True):
        return encode(record, self.processor, self.seed, self.max_length, self.image_folder, load_pixels,
                      template=self.template, placement=self.placement)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            if self.feature_cache is not None and record.images:
                input_ids, labels = self._tokens(index, record)
                features = torch.cat([self.feature_cache.load(image_key(image)) for image in record.images])
                return {"id": record.id, "input_ids": input_ids, "labels": labels, "vision_features": features}
            encoded = self._encode(record)
        except (DataError, ImageLoadError) as error:
            if self.strict:
                raise
            reason = str(error) if str(error).startswith(record.source) else f"{record.source} ({record.id}): {error}"
            return {"id": record.id, "skip": reason}
        item = {"id": record.id, "input_ids": encoded.input_ids, "labels": encoded.labels, "pixel_values": encoded.pixel_values}
        if encoded.image_sizes is not None:  # AnyRes
            item["image_sizes"] = encoded.image_sizes
        return item

    def _tokens(self, index: int, record) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self.tokens.get(index)
        if kept is None:
            try:
                encoded = self._encode(record, load_pixels=False)
            except DataError as error:
                self.tokens[index] = str(error)
                raise
            kept = self.tokens[index] = (encoded.input_ids.to(torch.int32), encoded.labels != -100)
        if isinstance(kept, str):
            raise DataError(kept)
        input_ids, answers = kept
        input_ids = input_ids.long()
        return input_ids, input_ids.masked_fill(~answers, -100)


def record_counts(records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, text characters, turns) per record: kept by `sources.Records`, counted for a plain list."""
    if hasattr(records, "chars"):
        return records.images, records.chars, records.turns
    rows = [(len(r.images), sum(len(text) for _, text in r.conversations), len(r.conversations)) for r in records]
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


def estimate_lengths(records, processor) -> list[int]:
    """Token counts for grouping by length, without images or templates rendered one by one: the text's tokens, 4
    a turn for the template's words, image_seq_length an image. Past EXACT_LENGTHS records the text's tokens come
    from its characters at the rate measured on RATE_SAMPLE evenly spread records: tokenizing every text took 62 s
    and 6.4 GB for a tenth of LLaVA-1.5's 665K records (bench_data_scale), and grouping needs lengths only roughly
    (the original grouped by word counts)."""
    images, chars, turns = record_counts(records)
    if not len(chars):
        return []
    exact = len(chars) <= EXACT_LENGTHS
    sample = np.arange(len(chars)) if exact else np.linspace(0, len(chars) - 1, min(RATE_SAMPLE, len(chars))).astype(np.int64)
    counts = np.zeros(len(sample), dtype=np.float64)
    for start in range(0, len(sample), 1000):  # in batches: only the counts are kept
        texts = [" ".join(text for _, text in records[int(index)].conversations) for index in sample[start:start + 1000]]
        ids = processor.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        counts[start:start + len(ids)] = [len(row) for row in ids]
    if exact:
        text_tokens = counts
    else:
        rate = counts.sum() / max(int(chars[sample].sum()), 1)
        text_tokens = np.rint(chars * rate)
    return (text_tokens + 4 * turns + processor.image_seq_length * images).astype(np.int64).tolist()


def unique_images(records) -> list:
    """Every image the records use, once, in a stable order (by key)."""
    images, seen = [], set()
    counts = record_counts(records)[0]
    for index in np.flatnonzero(counts):
        for image in records[int(index)].images:
            if image_key(image) not in seen:
                seen.add(image_key(image))
                images.append(image)
    return sorted(images, key=image_key)


def check_records(records, processor, seed: int, max_length: int, image_folder: str, template: str = "chat",
                  placement: str = "front") -> dict[str, list[str]]:
    """Every problem in the data, found before training: {reason kind: [ids]}; decodes every image."""
    problems: dict[str, list[str]] = {}
    for record in records:
        try:
            encode(record, processor, seed, max_length, image_folder, template=template, placement=placement)
        except (DataError, ImageLoadError) as error:
            problems.setdefault(problem_kind(str(error)), []).append(f"{record.id}: {error}")
    return problems


def repeated_ids(records) -> dict[str, int]:
    """{id: records holding it} for ids held by several records: legal (the original's ids are image ids), counted
    by --check-data so a repeat that is a copying mistake can be seen."""
    return {rid: count for rid, count in Counter(record.id for record in records).items() if count > 1}


def problem_kind(message: str) -> str:
    for key, kind in (("max-length", "too long"), ("context is", "too long"), ("cannot read image", "unreadable image"), ("no assistant", "no answer"),
                      ("<image> markers", "image markers"), ("tokenized to nothing", "empty answer")):
        if key in message:
            return kind
    return "invalid record"
