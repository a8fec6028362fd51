"""Continuous batching: one thread owns the model and steps every active answer together.

Between two decode steps the scheduler prefills the sequences that arrived (each over its own cache, which may
already hold a reused prefix), then they join the batch; a sequence that stops leaves it between steps. The batch is
one DynamicCache with each row's keys and values left-padded to the longest row, an attention mask hiding the
padding, and per-row positions, so one forward decodes every user's next token.

Why not transformers' own continuous batching (generation.continuous_batching in 5.24): its requests are lists of
token ids and its paged cache is filled from them, while a LLaVA prompt carries its image as features written over
the embeddings (inputs_embeds), and its sampling has no per-request seed. A padded DynamicCache needs neither.

A sequence whose cache is a StaticSlot (a CUDA-graph slot of one session, see static_slots) is stepped alone through
its slot: that keeps the graphs' speed for a single user on a GPU.
"""

import queue
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .decoding import Sampling, next_tokens
from .kv_cache import cache_over
from .static_slots import StaticSlot

END = object()  # the last item of a sequence's output queue
PREFILL_TOKENS = 2048  # prefilled per pause in decoding: more arrivals at once wait for the next pause


class QueueFull(RuntimeError):
    """More sequences are waiting than the scheduler accepts; the caller should retry later."""


class Sequence:
    """One answer being generated. `cache` holds the prompt's first tokens; `pending` (1, n) are the rest, which the
    prefill feeds. When `done` is set, `cache` holds every token fed (prompt and answer but the last, never fed
    back), or is None after a failed step."""

    def __init__(self, cache, pending: torch.Tensor, image_inputs: dict, sampling: Sampling, stop_ids: set[int],
                 cancel: threading.Event | None = None):
        self.cache, self.pending, self.image_inputs = cache, pending, image_inputs
        self.sampling, self.stop_ids = sampling, stop_ids
        self.generator = sampling.generator(pending.device)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" (an end token) or "length"
        self.error: BaseException | None = None
        # set by its reader leaving, or by whoever holds the Event (engine_process: a client gone while it waited)
        self._cancel = cancel or threading.Event()
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.done = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self):
        self._cancel.set()

    def emit(self, token: int) -> bool:
        """Records a sampled token; True when the sequence is finished."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        self.out.put(token)
        if len(self.tokens) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"
            return True
        return False

    def finish(self, error: BaseException | None = None):
        if error is not None:
            self.error, self.cache = error, None
        self.out.put(END)
        self.done.set()


class DecodeBatch:
    """The sequences decoding together and their keys and values in one DynamicCache. Row i's tokens are the
    columns where mask[i] is 1, in order; the others are padding (left of everything, and, after a batched prefill,
    between a row's cached prefix and the tokens it prefilled)."""

    def __init__(self, model):
        self.model, self.config = model, model.config.get_text_config()
        self.rows: list[Sequence] = []
        self.cache = self.mask = self.lengths = None  # mask (B, L): 1 on real tokens; lengths (B,): real tokens per row
        self.padded = False

    @classmethod
    def prefill(cls, model, sequences: list[Sequence]) -> tuple["DecodeBatch", torch.Tensor]:
        """Feeds every sequence's pending tokens after its cached prefix in one forward: row i is [padding][prefix i]
        [padding][pending i], so that every row's last token is in the last column. Returns the batch the sequences
        now form and the logits (B, vocab) after each one's last token."""
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
                       use_cache=True, logits_to_keep=1, **extra).logits[:, -1]
        batch.rows, batch.cache, batch.mask = list(sequences), cache, mask
        batch.lengths = torch.tensor([prefix + count for prefix, count in zip(prefixes, pending)], device=device)
        for sequence in sequences:
            sequence.cache, sequence.image_inputs = None, {}  # its keys and values live in the batch until it leaves
        return batch, logits

    def join(self, other: "DecodeBatch"):
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
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.mask.device)
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


class Scheduler:
    """Runs every submitted Sequence to its end on a thread of its own. At most `max_batch` decode at once; at most
    `max_waiting` wait for a place (more: QueueFull)."""

    def __init__(self, model, suppress: list[int], max_batch: int = 32, max_waiting: int = 256):
        self.model, self.suppress = model, suppress
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._waiting: list[Sequence] = []
        self._alone: list[Sequence] = []  # sequences over a StaticSlot, stepped one by one
        self._batch = DecodeBatch(model)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.peak_batch = 0  # the most rows one decode step ever had (tests and benchmarks read it)

    def submit(self, sequence: Sequence) -> Sequence:
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._waiting.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llava-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()
        return sequence

    def tokens(self, sequence: Sequence, interval: float = 0.0) -> Iterator[list[int]]:
        """The sequence's tokens as they come, in lists: all that arrived since the last read. With `interval`, the
        reader sleeps that long between reads (waking at once when the sequence ends): a reader woken for every
        token takes the interpreter from the scheduler's thread once per token, which on a busy CPU costs the
        whole batch its speed. Closing this early cancels the sequence and returns once the scheduler has let go
        of it (its cache is then final)."""
        try:
            ended = False
            while not ended:
                tokens = [sequence.out.get()]
                while not sequence.out.empty():
                    tokens.append(sequence.out.get())
                if ended := tokens[-1] is END:
                    tokens.pop()
                if tokens:
                    yield tokens
                if interval and not ended:
                    sequence.done.wait(interval)
            if sequence.error is not None:
                raise sequence.error
        finally:
            if not sequence.done.is_set():
                sequence.cancel()
                with self._wake:
                    self._wake.notify()
                sequence.done.wait()

    @property
    def active(self) -> int:
        return len(self._batch.rows) + len(self._alone)

    def _loop(self):
        while True:
            with self._wake:
                while not self._waiting and not self.active:
                    self._wake.wait()
                arrivals = self._admit()
            try:
                for sequence in arrivals:
                    if sequence.cancelled:  # its reader left while it waited
                        sequence.finish()
                self._prefill([sequence for sequence in arrivals if not sequence.done.is_set()])
                self._decode()
            except Exception as error:  # a bug of ours: fail what is running, keep serving the next ones
                for sequence in [*self._alone, *arrivals]:
                    if not sequence.done.is_set():
                        sequence.finish(error)
                self._alone = []
                self._batch.fail(error)

    def _admit(self) -> list[Sequence]:
        arrivals, budget = [], PREFILL_TOKENS
        while self._waiting and self.active + len(arrivals) < self.max_batch and (budget > 0 or not arrivals):
            sequence = self._waiting.pop(0)
            budget -= sequence.pending.shape[1]
            arrivals.append(sequence)
        return arrivals

    @torch.no_grad()
    def _prefill(self, arrivals: list[Sequence]):
        """Slot sequences one by one through their slots; all others in one batched forward, then into the batch."""
        for sequence in [sequence for sequence in arrivals if isinstance(sequence.cache, StaticSlot)]:
            try:
                logits = sequence.cache.forward(sequence.pending, sequence.image_inputs)
            except Exception as error:
                sequence.finish(error)
                continue
            sequence.image_inputs = {}  # the image entered the cache with the prompt
            if sequence.emit(next_tokens(logits, [sequence.sampling], [sequence.generator], self.suppress)[0]):
                sequence.finish()
            else:
                self._alone.append(sequence)
        batched = [sequence for sequence in arrivals if not isinstance(sequence.cache, StaticSlot)]
        if not batched:
            return
        try:
            joining, logits = DecodeBatch.prefill(self.model, batched)
        except Exception as error:
            for sequence in batched:
                sequence.finish(error)
            return
        tokens = next_tokens(logits, [sequence.sampling for sequence in batched], [sequence.generator for sequence in batched],
                             self.suppress)
        offset = len(self._batch.rows)
        self._batch.join(joining)
        self._leave([offset + row for row, (sequence, token) in enumerate(zip(batched, tokens)) if sequence.emit(token)])

    @torch.no_grad()
    def _decode(self):
        for sequence in list(self._alone):
            try:
                finished = sequence.cancelled
                if not finished:
                    logits = sequence.cache.forward(torch.tensor([[sequence.tokens[-1]]], device=sequence.pending.device), {})
                    finished = sequence.emit(next_tokens(logits, [sequence.sampling], [sequence.generator], self.suppress)[0])
            except Exception as error:
                self._alone.remove(sequence)
                sequence.finish(error)
                continue
            if finished:
                self._alone.remove(sequence)
                sequence.finish()
        batch = self._batch
        self._leave([index for index, row in enumerate(batch.rows) if row.cancelled])
        if not batch.rows:
            return
        self.peak_batch = max(self.peak_batch, len(batch.rows))
        try:
            logits = batch.step()
        except Exception as error:
            return batch.fail(error)
        tokens = next_tokens(logits, [row.sampling for row in batch.rows], [row.generator for row in batch.rows], self.suppress)
        self._leave([index for index, (row, token) in enumerate(zip(batch.rows, tokens)) if row.emit(token)])

    def _leave(self, indices: list[int]):
        if indices:
            leaving = [self._batch.rows[index] for index in indices]
            self._batch.remove(indices)
            for sequence in leaving:
                sequence.finish()
