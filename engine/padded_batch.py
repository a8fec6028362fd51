"""The batch of decoding sequences as one transformers DynamicCache, each row left-padded to the longest: the
fallback for models whose attention row_batch cannot express (sliding-window or hybrid layers, attention kernels
that take no 4D mask), since transformers builds their masks and window caches itself.

Row i's tokens are the columns where mask[i] is 1, in order; the others are padding (left of everything, and, after
a batched prefill, between a row's cached prefix and the tokens it prefilled). Joining and leaving re-pad every row
(a copy of the whole batch per request), which row_batch avoids."""

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .kv_cache import cache_over


class PaddedBatch:
    """The sequences decoding together (scheduler.Sequence) and their keys and values in one DynamicCache, with the
    interface of row_batch.RowBatch."""

    def __init__(self, model):
        self.model, self.config = model, model.config.get_text_config()
        self.rows: list = []
        self.cache = self.mask = self.lengths = None  # mask (B, L): 1 on real tokens; lengths (B,): real tokens per row
        self.padded = False

    def riders(self, sequences: list) -> list:
        """None: every arrival is prefilled in a forward of its own here (see RowBatch.riders)."""
        return []

    def prefill(self, sequences: list, every_position: bool = False) -> tuple[list[int], torch.Tensor | list[torch.Tensor]]:
        """Prefills the sequences (see `prefilled`) and takes them in; returns their rows and their logits (with
        `every_position`, per sequence those after each of its pending tokens, as RowBatch.prefill's)."""
        joining, logits = self.prefilled(self.model, sequences, every_position)
        offset = len(self.rows)
        self.join(joining)
        return list(range(offset, offset + len(sequences))), logits

    @classmethod
    def prefilled(cls, model, sequences: list, every_position: bool = False) -> tuple["PaddedBatch", torch.Tensor | list[torch.Tensor]]:
        """Feeds every sequence's pending tokens after its cached prefix in one forward: row i is [padding][prefix i]
        [padding][pending i], so that every row's last token is in the last column. Returns the batch the sequences
        form and the logits (B, vocab) after each one's last token, or with `every_position` per sequence those
        after each of its pending tokens."""
        batch, device = cls(model), sequences[0].pending.device
        prefixes = [sequence.cache.get_seq_length() for sequence in sequences]
        pending = [sequence.pending.shape[1] for sequence in sequences]
        width, new = max(prefixes), max(pending)
        shaped = next((sequence.cache for sequence in sequences if sequence.cache.get_seq_length()), None)
        if shaped is None:  # nothing cached in any row
            cache = DynamicCache(config=batch.config)
        else:
            def tensor(sequence, layer, name):
                if sequence.cache.get_seq_length():
                    return getattr(sequence.cache.layers[layer], name)
                like = getattr(shaped.layers[layer], name)
                return like.new_zeros((1, like.shape[1], 0, like.shape[3]))

            cache = cache_over(batch.config, [
                tuple(torch.cat([pad_left(tensor(sequence, layer, name), width) for sequence in sequences]) for name in ("keys", "values"))
                for layer in range(len(shaped.layers))])
        ids = torch.zeros((len(sequences), new), dtype=torch.long, device=device)  # 0 is never the image token
        mask = torch.zeros((len(sequences), width + new), dtype=torch.long, device=device)
        positions = torch.zeros((len(sequences), new), dtype=torch.long, device=device)
        for row, (sequence, prefix, count) in enumerate(zip(sequences, prefixes, pending)):
            ids[row, new - count:] = sequence.pending[0]
            mask[row, width - prefix: width] = 1
            mask[row, width + new - count:] = 1
            positions[row] = prefix + torch.arange(new, device=device) - (new - count)
        positions.clamp_(min=0)  # the padding's positions: any, it is masked out
        # the images' features in row order, as merge_image_features fills the image tokens row after row
        features = [sequence.image_inputs["vision_features"] for sequence in sequences if sequence.image_inputs]
        extra = {"vision_features": torch.cat(features)} if features else {}
        sizes = [sequence.image_inputs["image_sizes"] for sequence in sequences if "image_sizes" in sequence.image_inputs]
        if sizes:  # AnyRes: each image's size lays out its tiles
            extra["image_sizes"] = torch.cat(sizes)
        batch.padded = bool((mask == 0).any())
        logits = model(input_ids=ids, cache=cache, attention_mask=mask if batch.padded else None, position_ids=positions,
                       use_cache=True, logits_to_keep=0 if every_position else 1, **extra).logits
        # each row's pending tokens are its last `count` columns
        logits = [logits[row, new - count:] for row, count in enumerate(pending)] if every_position else logits[:, -1]
        batch.rows, batch.cache, batch.mask = list(sequences), cache, mask
        batch.lengths = torch.tensor([prefix + count for prefix, count in zip(prefixes, pending)], device=device)
        for sequence in sequences:
            sequence.cache, sequence.image_inputs = None, {}  # its keys and values live in the batch until it leaves
        return batch, logits

    def join(self, other: "PaddedBatch"):
        """Takes in the rows of `other`, both sides left-padded to the longer one."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.lengths, self.padded = other.rows, other.cache, other.mask, other.lengths, other.padded
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.cache = cache_over(self.config, [
            (torch.cat([pad_left(mine.keys, width), pad_left(theirs.keys, width)]),
             torch.cat([pad_left(mine.values, width), pad_left(theirs.values, width)]))
            for mine, theirs in zip(self.cache.layers, other.cache.layers)])
        self.mask = torch.cat([pad_left(self.mask, width), pad_left(other.mask, width)])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.rows = self.rows + other.rows
        self.padded = bool((self.mask == 0).any())

    def step(self) -> torch.Tensor:
        """Feeds every row's last token; returns the logits (B, vocab) of the next."""
        ids = torch.tensor([[row.next_input] for row in self.rows], device=self.mask.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        # without padding, no mask: SDPA's causal kernel instead of an explicit one
        logits = self.model(input_ids=ids, cache=self.cache, attention_mask=mask if self.padded else None,
                            position_ids=self.lengths[:, None], use_cache=True, logits_to_keep=1).logits[:, -1]
        self.mask, self.lengths = mask, self.lengths + 1
        return logits

    def remove(self, leaving: list[int]):
        """Takes rows out; each leaving sequence gets its own cache back, unpadded (a copy: the batch moves on)."""
        for index in leaving:
            columns = self.mask[index].nonzero()[:, 0]
            self.rows[index].cache = cache_over(self.config, [
                (layer.keys[index: index + 1, :, columns], layer.values[index: index + 1, :, columns]) for layer in self.cache.layers])
        staying = [index for index in range(len(self.rows)) if index not in set(leaving)]
        self.rows = [self.rows[index] for index in staying]
        if not self.rows:
            self.cache = self.mask = self.lengths = None
            return
        rows = torch.tensor(staying, device=self.mask.device)
        start = int(self.mask[rows].any(dim=0).nonzero()[0])  # columns that are padding in every row left are dropped
        self.cache = cache_over(self.config, [
            (layer.keys[rows, :, start:], layer.values[rows, :, start:]) for layer in self.cache.layers])
        self.mask, self.lengths = self.mask[rows, start:], self.lengths[rows]
        self.padded = bool((self.mask == 0).any())

    def fail(self, error: BaseException):
        for row in self.rows:
            row.finish(error)
        self.rows, self.cache, self.mask, self.lengths = [], None, None, None


def pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before dim -2 of a (B, H, T, D) cache tensor, or dim -1 of a (B, T) mask, up to `width`."""
    if tensor.dim() == 2:
        return F.pad(tensor, (width - tensor.shape[-1], 0))
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))
