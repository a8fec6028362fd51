"""Batches: samples grouped by modality and length so a batch holds similar lengths (little padding), shuffled
deterministically per (seed, epoch) so a resumed run sees the same order; and the padding collator."""

import random

import torch


class GroupedBatchSampler:
    """Yields lists of indices. Image and text-only samples never share a batch; within a megabatch of
    `batch_size * megabatch` samples, batches are cut from the length-sorted order; batches are then shuffled."""

    def __init__(self, lengths: list[int], has_image: list[bool], batch_size: int, seed: int, group_by_length: bool = True,
                 megabatch: int = 64, drop_last: bool = False, length_bucket: int = 1):
        """`length_bucket`: lengths are compared in steps of this many tokens, and samples within one step stay in
        their shuffled order. Exact sorting (1) cuts batches of one kind of sample where kinds differ in length (a
        batch of only "Where is ...?" questions, then one of only counts), which a small model learnt worse from."""
        if length_bucket < 1:
            raise ValueError(f"length_bucket must be at least 1 token, got {length_bucket}")
        self.length_bucket = length_bucket
        self.lengths, self.has_image, self.batch_size = lengths, has_image, batch_size
        self.seed, self.group_by_length, self.megabatch, self.drop_last = seed, group_by_length, megabatch, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        if not self.group_by_length:
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            return self._cut(order)
        batches, leftovers = [], []
        for modality in (True, False):
            order = [index for index, image in enumerate(self.has_image) if image == modality]
            rng.shuffle(order)
            size = self.batch_size * self.megabatch
            for start in range(0, len(order), size):
                chunk = sorted(order[start:start + size], key=lambda index: -(self.lengths[index] // self.length_bucket))
                cut = self._cut(chunk)
                if cut and len(cut[-1]) < self.batch_size:
                    leftovers += cut.pop()
                batches += cut
        rng.shuffle(batches)
        # Only the last batch may be short: Accelerate's per-process sharding expects full batches before it.
        return batches + self._cut(sorted(leftovers, key=lambda index: -self.lengths[index]))

    def _cut(self, order: list[int]) -> list[list[int]]:
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        return [batch for batch in batches if len(batch) == self.batch_size] if self.drop_last else batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the tokens in padded batches that are padding."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / padded if padded else 0.0


class Collator:
    """Pads to the longest sample (right padding); samples the dataset could not use travel in `skipped`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        good = [item for item in items if "skip" not in item]
        batch = {"skipped": [(item["id"], item["skip"]) for item in items if "skip" in item], "ids": [item["id"] for item in good]}
        if not good:
            return batch
        longest = max(len(item["input_ids"]) for item in good)
        input_ids = torch.full((len(good), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(good), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(good), longest), dtype=torch.long)
        for row, item in enumerate(good):
            length = len(item["input_ids"])
            input_ids[row, :length], labels[row, :length], attention_mask[row, :length] = item["input_ids"], item["labels"], 1
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        pixels = [item["pixel_values"] for item in good if item.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # AnyRes: every image's tiles, flat; image_sizes tells them apart
        sizes = [item["image_sizes"] for item in good if item.get("image_sizes") is not None]
        if sizes:
            batch["image_sizes"] = torch.cat(sizes)
        features = [item["vision_features"] for item in good if item.get("vision_features") is not None]
        if features:
            batch["vision_features"] = torch.cat(features)
        return batch
