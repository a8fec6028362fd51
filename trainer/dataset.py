"""The dataset the loop reads: records encoded on the fly; a record that turns out unusable (unreadable image, too
long) comes back as a skip marker with the reason, never as an exception that would end a long run."""

import torch
from torch.utils.data import Dataset

from .data import DataError, ImageLoadError, Record, encode
from .feature_cache import FeatureCache


class LlavaDataset(Dataset):
    """With a feature cache, a record's tokens are rendered once and kept (int32 ids and an answer mask, 5 bytes a
    token): rendering the chat template took a third of a stage-2 step of the shapes model, every epoch again."""

    def __init__(self, records: list[Record], processor, seed: int, max_length: int, image_folder: str,
                 strict: bool = False, feature_cache: FeatureCache | None = None):
        self.records, self.processor, self.seed = records, processor, seed
        self.max_length, self.image_folder, self.strict, self.feature_cache = max_length, image_folder, strict, feature_cache
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor] | str] = {}  # index -> (ids, answer mask) or why unusable

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            if self.feature_cache is not None and record.image:
                input_ids, labels = self._tokens(index)
                return {"id": record.id, "input_ids": input_ids, "labels": labels,
                        "vision_features": self.feature_cache.load(record.image)}
            encoded = encode(record, self.processor, self.seed, self.max_length, self.image_folder)
        except (DataError, ImageLoadError) as error:
            if self.strict:
                raise
            return {"id": record.id, "skip": str(error)}
        item = {"id": record.id, "input_ids": encoded.input_ids, "labels": encoded.labels, "pixel_values": encoded.pixel_values}
        if encoded.image_sizes is not None:  # AnyRes
            item["image_sizes"] = encoded.image_sizes
        return item

    def _tokens(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self.tokens.get(index)
        if kept is None:
            try:
                encoded = encode(self.records[index], self.processor, self.seed, self.max_length, self.image_folder, load_pixels=False)
            except DataError as error:
                self.tokens[index] = str(error)
                raise
            kept = self.tokens[index] = (encoded.input_ids.to(torch.int32), encoded.labels != -100)
        if isinstance(kept, str):
            raise DataError(kept)
        input_ids, answers = kept
        input_ids = input_ids.long()
        return input_ids, input_ids.masked_fill(~answers, -100)


def estimate_lengths(records: list[Record], processor) -> list[int]:
    """Token counts without images or templates rendered one by one: fast enough for 665K records, close enough to
    group by length (the image adds a fixed image_seq_length)."""
    texts = [" ".join(text for _, text in record.conversations) for record in records]
    counts = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return [count + 4 * len(record.conversations) + (processor.image_seq_length if record.image else 0)
            for count, record in zip(counts, records)]


def check_records(records: list[Record], processor, seed: int, max_length: int, image_folder: str) -> dict[str, list[str]]:
    """Every problem in the data, found before training: {reason kind: [ids]}; decodes every image."""
    problems: dict[str, list[str]] = {}
    for record in records:
        try:
            encode(record, processor, seed, max_length, image_folder)
        except (DataError, ImageLoadError) as error:
            problems.setdefault(problem_kind(str(error)), []).append(f"{record.id}: {error}")
    return problems


def problem_kind(message: str) -> str:
    for key, kind in (("max-length", "too long"), ("context is", "too long"), ("cannot read image", "unreadable image"), ("no assistant", "no answer"),
                      ("<image> markers", "image markers"), ("tokenized to nothing", "empty answer")):
        if key in message:
            return kind
    return "invalid record"

