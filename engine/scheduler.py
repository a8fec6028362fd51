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
from .static_slots import StaticSlot

END = object()  # the last item of a sequence's output queue
PREFILL_TOKENS = 2048  # prefilled per pause in decoding: more arrivals at once wait for the next pause


class QueueFull(RuntimeError):
    """More sequences are waiting than the scheduler accepts; the caller should retry later."""


class Sequence:
    """One answer being generated. `cache` holds the prompt's first tokens; `pending` (1, n) are the rest, which the
    prefill feeds. When `done` is set, `cache` holds every token fed (prompt and answer but the last, never fed
    back), or is None after a failed step."""

    def __init__(self, cache, pending: torch.Tensor, image_inputs: dict, sampling: Sampling, stop_ids: set[int]):
        self.cache, self.pending, self.image_inputs = cache, pending, image_inputs
        self.sampling, self.stop_ids = sampling, stop_ids
        self.generator = sampling.generator(pending.device)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" (an end token) or "length"
        self.error: BaseException | None = None
        self.cancelled = False
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.done = threading.Event()

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
    """The sequences decoding together and their keys and values, left-padded into one DynamicCache."""

    def __init__(self, model):
        self.model, self.config = model, model.config.get_text_config()
        self.rows: list[Sequence] = []
        self.cache = self.mask = self.lengths = None  # mask (B, L): 1 on real tokens; lengths (B,): real tokens per row

    def add(self, sequence: Sequence):
        layers = [(layer.keys, layer.values) for layer in sequence.cache.layers]
        length = sequence.cache.get_seq_length()
        ones = torch.ones((1, length), dtype=torch.long, device=layers[0][0].device)
        if not self.rows:
            self.cache = DynamicCache(ddp_cache_data=layers, config=self.config)
            self.mask, self.lengths = ones, torch.tensor([length], device=ones.device)
        else:
            width = max(self.mask.shape[1], length)
            merged = [(torch.cat([pad_left(layer.keys, width), pad_left(keys, width)]),
                       torch.cat([pad_left(layer.values, width), pad_left(values, width)]))
                      for layer, (keys, values) in zip(self.cache.layers, layers)]
            self.cache = DynamicCache(ddp_cache_data=merged, config=self.config)
            self.mask = torch.cat([pad_left(self.mask, width), pad_left(ones, width)])
            self.lengths = torch.cat([self.lengths, self.lengths.new_tensor([length])])
        self.rows.append(sequence)
        sequence.cache = None  # its keys and values live in the batch until it leaves
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
        width = self.mask.shape[1]
        for index in leaving:
            length = int(self.lengths[index])
            self.rows[index].cache = DynamicCache(config=self.config, ddp_cache_data=[
                (layer.keys[index: index + 1, :, width - length:].clone(), layer.values[index: index + 1, :, width - length:].clone())
                for layer in self.cache.layers])
        staying = [index for index in range(len(self.rows)) if index not in set(leaving)]
        self.rows = [self.rows[index] for index in staying]
        if not self.rows:
            self.cache = self.mask = self.lengths = None
            return
        rows = torch.tensor(staying, device=self.mask.device)
        start = width - int(self.lengths[rows].max())  # columns that are padding in every row left are dropped
        self.cache = DynamicCache(config=self.config, ddp_cache_data=[
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

    def tokens(self, sequence: Sequence) -> Iterator[int]:
        """The sequence's tokens as they come. Closing this early cancels the sequence and returns once the
        scheduler has let go of it (its cache is then final)."""
        try:
            while (item := sequence.out.get()) is not END:
                yield item
            if sequence.error is not None:
                raise sequence.error
        finally:
            if not sequence.done.is_set():
                sequence.cancelled = True
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
                    self._prefill(sequence)
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
    def _prefill(self, sequence: Sequence):
        if sequence.cancelled:
            return sequence.finish()
        try:
            if isinstance(sequence.cache, StaticSlot):
                logits = sequence.cache.forward(sequence.pending, sequence.image_inputs)
            else:
                logits = self.model(input_ids=sequence.pending, cache=sequence.cache, use_cache=True, logits_to_keep=1,
                                    **sequence.image_inputs).logits[:, -1]
        except Exception as error:
            return sequence.finish(error)
        sequence.image_inputs = {}  # the image entered the cache with the prompt
        if sequence.emit(next_tokens(logits, [sequence.sampling], [sequence.generator], self.suppress)[0]):
            return sequence.finish()
        if isinstance(sequence.cache, StaticSlot):
            self._alone.append(sequence)
        else:
            self._batch.add(sequence)

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
