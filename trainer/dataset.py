"""The dataset the loop reads: records encoded on the fly; a record that turns out unusable (unreadable image, too
long) comes back as a skip marker with the reason, never as an exception that would end a long run."""

from torch.utils.data import Dataset

from .data import DataError, ImageLoadError, Record, encode
from .feature_cache import FeatureCache


class LlavaDataset(Dataset):
    def __init__(self, records: list[Record], processor, seed: int, max_length: int, image_folder: str,
                 strict: bool = False, feature_cache: FeatureCache | None = None):
        self.records, self.processor, self.seed = records, processor, seed
        self.max_length, self.image_folder, self.strict, self.feature_cache = max_length, image_folder, strict, feature_cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            if self.feature_cache is not None and record.image:
                encoded = encode(record, self.processor, self.seed, self.max_length, self.image_folder, load_pixels=False)
                item = {"vision_features": self.feature_cache.load(record.image)}
            else:
                encoded = encode(record, self.processor, self.seed, self.max_length, self.image_folder)
                item = {"pixel_values": encoded.pixel_values}
        except (DataError, ImageLoadError) as error:
            if self.strict:
                raise
            return {"id": record.id, "skip": str(error)}
        return {"id": record.id, "input_ids": encoded.input_ids, "labels": encoded.labels, **item}


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

