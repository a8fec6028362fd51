import random

import pytest
import torch

from trainer.batching import Collator, GroupedBatchSampler, padding_fraction


def llava_like_lengths(count=4000, seed=0):
    """Image samples 600-1200 tokens (576 image tokens + text), text-only 20-800, as in the LLaVA-1.5 mixture."""
    rng = random.Random(seed)
    has_image = [rng.random() < 0.85 for _ in range(count)]
    lengths = [576 + int(rng.lognormvariate(4.5, 0.8)) % 700 if image else 20 + int(rng.lognormvariate(5, 0.9)) % 780
               for image in has_image]
    return lengths, has_image


def test_grouping_cuts_padding_and_keeps_modalities_apart():
    lengths, has_image = llava_like_lengths()
    grouped = GroupedBatchSampler(lengths, has_image, batch_size=16, seed=0).batches()
    shuffled = GroupedBatchSampler(lengths, has_image, batch_size=16, seed=0, group_by_length=False).batches()
    assert padding_fraction(grouped, lengths) < 0.05 < padding_fraction(shuffled, lengths)
    assert all(len({has_image[i] for i in batch}) == 1 for batch in grouped[:-1])  # the last gathers the remainders
    assert all(len(batch) == 16 for batch in grouped[:-1])  # only the last may be short (per-process sharding needs it)
    assert sorted(i for batch in grouped for i in batch) == list(range(len(lengths)))  # every sample once


def test_length_buckets_mix_kinds_of_nearly_equal_length_at_little_padding():
    # Three kinds of short question whose samples differ by a few tokens, as the shapes world's do: exact sorting
    # cuts batches of one kind; 16-token buckets mix them.
    rng = random.Random(0)
    kinds = [rng.randrange(3) for _ in range(3000)]
    lengths = [48 + 4 * kind + rng.randrange(2) for kind in kinds]
    has_image = [True] * len(lengths)

    def dominant_share(batches):
        return sum(max(sum(kinds[i] == k for i in batch) for k in range(3)) / len(batch) for batch in batches) / len(batches)

    exact = GroupedBatchSampler(lengths, has_image, batch_size=32, seed=0).batches()
    bucketed = GroupedBatchSampler(lengths, has_image, batch_size=32, seed=0, length_bucket=16).batches()
    assert dominant_share(exact) > 0.9 and dominant_share(bucketed) < 0.5
    assert padding_fraction(exact, lengths) < padding_fraction(bucketed, lengths) < 0.15
    assert sorted(i for batch in bucketed for i in batch) == list(range(len(lengths)))
    with pytest.raises(ValueError, match="length_bucket"):
        GroupedBatchSampler(lengths, has_image, batch_size=32, seed=0, length_bucket=0)


def test_order_is_seeded_per_epoch():
    lengths, has_image = llava_like_lengths(500)
    sampler = GroupedBatchSampler(lengths, has_image, batch_size=8, seed=3)
    first = list(sampler)
    assert first == list(GroupedBatchSampler(lengths, has_image, batch_size=8, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_collator_pads_and_passes_skips_along():
    items = [
        {"id": "a", "input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.zeros(1, 3, 4, 4)},
        {"id": "b", "skip": "cannot read image b.png"},
        {"id": "c", "input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None},
    ]
    batch = Collator(pad_token_id=0)(items)
    assert batch["skipped"] == [("b", "cannot read image b.png")] and batch["ids"] == ["a", "c"]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["pixel_values"].shape == (1, 3, 4, 4)
