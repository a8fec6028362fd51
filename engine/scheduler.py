"""Continuous batching: one thread owns the model and steps every active answer together.

Between two decode steps the scheduler takes in the sequences that arrived (each with its own cache, which may
already hold a reused prefix): those with a long rest of their prompt to feed are prefilled together in one forward,
the others join and have theirs fed by the next decode step (row_batch's riders); a sequence that stops leaves the
batch between steps. The batch (row_batch: each sequence keeps one row of preallocated key/value buffers; padded_batch for the
models whose attention that cannot express) gives every row its own positions and mask, so one forward decodes every
user's next token.

Why not transformers' own continuous batching (generation.continuous_batching in 5.24): its requests are lists of
token ids and its paged cache is filled from them, while a LLaVA prompt carries its image as features written over
the embeddings (inputs_embeds), and its sampling has no per-request seed. Our batches need neither.

A sequence whose cache is a StaticSlot (a CUDA-graph slot of one session, see static_slots) is stepped alone through
its slot: that keeps the graphs' speed for a single user on a GPU.
"""

import queue
import threading
import time
from collections.abc import Iterator

import torch

from .decoding import NonFiniteScores, Sampling, TokenLogprob, next_tokens, prompt_logprobs, token_logprobs
from .padded_batch import PaddedBatch
from .penalties import Penalties
from .row_batch import RowBatch
from .prompts import StructureRefused, TokenRulesRefused
from .static_slots import StaticSlot
from .structured_output import Constraint

END = object()  # the last item of a sequence's output queue
PREFILL_TOKENS = 2048  # prefilled per pause in decoding: more arrivals at once wait for the next pause
# Prompts scored in one forward: at most this many logits (padded positions x vocabulary), which the forward keeps
# all of (1 GB in float32: 8k positions of a 32k vocabulary, 2k of a 128k one). A longer prompt is not scored
# (ChatEngine refuses it).
SCORED_LOGITS = 2**28


class QueueFull(RuntimeError):
    """More sequences are waiting than the scheduler accepts; the caller should retry later."""


class Sequence:
    """One answer being generated. `cache` holds the prompt's first tokens; `pending` (1, n) are the rest, which the
    prefill feeds. When `done` is set, `cache` holds every token fed (prompt and answer but the last, never fed
    back), or is None after a failed step."""

    def __init__(self, cache, pending: torch.Tensor, image_inputs: dict, sampling: Sampling, stop_ids: set[int],
                 cancel: threading.Event | None = None, prompt: list[int] | None = None, constraint: Constraint | None = None):
        self.cache, self.pending, self.image_inputs = cache, pending, image_inputs
        self.constraint = constraint  # its structured output's place in its grammar (sampling.structure), if it has one
        self.sampling, self.stop_ids = sampling, stop_ids
        self.stop_token_ids = frozenset(sampling.stop_token_ids)  # the request's own (stop_ids: the model's end tokens)
        # its own score adjustments, if it asked for any; `prompt`: all of its prompt's ids, which the repetition
        # penalty counts (without it, the pending ones)
        if sampling.repetition_penalty != 1 and prompt is None:
            prompt = pending[0].tolist()
        self.penalties = Penalties(sampling, prompt or []) if Penalties.wanted(sampling) else None
        self.generator = sampling.generator(pending.device)
        self.tokens: list[int] = []
        # with sampling.logprobs: tokens[i]'s in logprobs[i], and the end token's that finished it in `ended_by`
        self.logprobs: list[TokenLogprob] = []
        self.ended_by: TokenLogprob | None = None
        self.end_drawn = False  # it ended at an end token it drew: one token more than `tokens` (usage counts it)
        self.end_token: int | None = None  # that token
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # with sampling.prompt_logprobs, before any token
        self.finish_reason: str | None = None  # "stop" (an end token) or "length"
        self.stop_reason: int | None = None  # the stop token id of the request's own that ended it (vLLM's stop_reason)
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

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds: the last one sampled, or, for a sequence that joined the batch with
        only its prompt's last token left to feed (a rider, see RowBatch.riders), that token."""
        return self.tokens[-1] if self.tokens else int(self.pending[0, -1])

    @property
    def blocked(self) -> set[int]:
        """The tokens its next one may not be: its end tokens and stop tokens while it is short of its min_tokens (with
        ignore_eos too, as vLLM's min_tokens blocks every stop token: an end token would not end the answer there, but
        an answer of at least min_tokens tokens has none of them before)."""
        if len(self.tokens) >= self.sampling.min_tokens:
            return set()
        return self.stop_ids | self.stop_token_ids

    @property
    def scores_prompt(self) -> bool:
        """Whether its prompt is scored: then it is fed whole (no cached prefix), with the logits of every position
        (Scheduler._score)."""
        return self.sampling.prompt_logprobs is not None

    def emit(self, token: int | None, logprob: TokenLogprob | None = None) -> bool:
        """Records a sampled token (and its log-probability, if asked for); True when the sequence is finished. None
        (next_tokens: its scores were not numbers) finishes it with NonFiniteScores."""
        if self.constraint is not None and self.constraint.slow is not None:  # every answer of the batch waited for it
            self.error = StructureRefused(f"after {len(self.tokens)} tokens, the structured output's grammar "
                                          f"{self.constraint.slow} (every answer decoding waits for it)")
            return True
        if token is None:
            if self.constraint is not None:  # or its grammar had no token left (all suppressed: a grammar of special tokens)
                self.error = NonFiniteScores(f"after {len(self.tokens)} tokens, no token was left that both the structured "
                                             "output allows and the model's scores make possible (NaN or infinite scores, "
                                             "or only tokens never generated)")
            elif self.blocked or self.penalties is not None and (self.sampling.allowed_token_ids is not None or self.sampling.bad_words):
                self.error = TokenRulesRefused(f"after {len(self.tokens)} tokens, no token was left that the answer's "
                                               "allowed_token_ids, bad_words and stop_token_ids (before min_tokens) allow")
            else:
                self.error = NonFiniteScores(f"the model's next-token scores for this answer were NaN or infinite after "
                                             f"{len(self.tokens)} tokens; if the model runs in float16, bfloat16 or float32 "
                                             f"may not overflow")
            return True
        stops = token in self.stop_ids and not self.sampling.ignore_eos  # blocked (see `blocked`) before min_tokens
        if asked := token in self.stop_token_ids and not stops:  # a stop token of the request's own, as vLLM's
            self.stop_reason = token
        if stops or asked and not self.sampling.include_stop_str_in_output:
            self.finish_reason, self.ended_by, self.end_drawn, self.end_token = "stop", logprob, True, token
            return True
        if self.constraint is not None and not self.constraint.accept(token):  # its mask allowed it: a bug of ours
            self.error = RuntimeError(f"the structured output's grammar refused the token {token} it allowed")
            return True
        if logprob is not None:  # before the token: whoever reads the token finds its log-probability
            self.logprobs.append(logprob)
        if self.penalties is not None:
            self.penalties.add(token)
        self.tokens.append(token)
        self.out.put(token)
        if asked:  # kept in the answer (include_stop_str_in_output), and its last token
            self.finish_reason = "stop"
            return True
        if self.constraint is not None and self.constraint.complete:  # an end token it took with ignore_eos: nothing may follow
            self.finish_reason = "stop"
            return True
        if len(self.tokens) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"
            return True
        return False

    def finish(self, error: BaseException | None = None):
        """Ends it, once: a failed step's handler may reach a sequence twice (an arrival that joined the batch), and
        a second END would reach its reader as a token."""
        if self.done.is_set():
            return
        if error is not None:
            self.error = error
        if self.error is not None:  # a failed step's cache, or one holding what gave NaN scores: never reused
            self.cache = None
        self.out.put(END)
        self.done.set()


class Scheduler:
    """Runs every submitted Sequence to its end on a thread of its own. At most `max_batch` decode at once; at most
    `max_waiting` wait for a place (more: QueueFull)."""

    def __init__(self, model, suppress: list[int], max_batch: int = 32, max_waiting: int = 256):
        self.model, self.suppress = model, suppress
        self.vocabulary = model.config.get_text_config().vocab_size  # the width of a position's logits
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._waiting: list[Sequence] = []
        self._alone: list[Sequence] = []  # sequences over a StaticSlot, stepped one by one
        self._batch = RowBatch(model) if RowBatch.supports(model) else PaddedBatch(model)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.peak_batch = 0  # the most rows one decode step ever had (tests and benchmarks read it)
        # What the scheduler's thread did, for /metrics and the benchmarks (rows per step = decode_rows / decode_steps:
        # how full the batch ran). Written on that thread only; its keys are fixed, so a reader's copy never races.
        self.counts = dict.fromkeys(["decode_steps", "decode_rows", "riders", "prefill_forwards",
                                     "prefill_sequences", "slot_steps"], 0)
        self.busy_seconds = 0.0  # in forwards and sampling, not waiting for work

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

    def tokens(self, sequence: Sequence, interval: float = 0.0) -> Iterator[tuple[list[int], bool]]:
        """The sequence's tokens as they come, in lists: all that arrived since the last read, each with whether it
        is the last (the sequence ended with it: its reader can send the end with its last tokens, one message and
        one write less per answer). With `interval`, the reader sleeps that long between reads (waking at once when
        the sequence ends): a reader woken for every token takes the interpreter from the scheduler's thread once
        per token, which on a busy CPU costs the whole batch its speed. Closing this early cancels the sequence and
        returns once the scheduler has let go of it (its cache is then final)."""
        try:
            ended = False
            while not ended:
                tokens = [sequence.out.get()]
                while not sequence.out.empty():
                    tokens.append(sequence.out.get())
                if ended := tokens[-1] is END:
                    tokens.pop()
                if tokens or ended:
                    yield tokens, ended
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

    def stats(self) -> dict:
        """A snapshot of the counts, the busy time and the answers decoding (`running`) and waiting for a place."""
        return {**self.counts, "busy_seconds": self.busy_seconds, "running": self.active, "waiting": len(self._waiting)}

    def _loop(self):
        while True:
            with self._wake:
                while not self._waiting and not self.active:
                    self._wake.wait()
                arrivals = self._admit()
            start = time.perf_counter()
            try:
                for sequence in arrivals:
                    if sequence.cancelled:  # its reader left while it waited: it ends without its prefill
                        sequence.finish()
                self._join([sequence for sequence in arrivals if not sequence.done.is_set()])
                self._decode()
            except Exception as error:  # a bug of ours: fail what is running, keep serving the next ones
                for sequence in [*self._alone, *arrivals]:
                    if not sequence.done.is_set():
                        sequence.finish(error)
                self._alone = []
                self._batch.fail(error)
            self.busy_seconds += time.perf_counter() - start

    def _admit(self) -> list[Sequence]:
        """The waiting sequences that get a place (and the prefill budget) now, and every cancelled one, place or not:
        its reader is gone, or going."""
        cancelled = [sequence for sequence in self._waiting if sequence.cancelled]
        if cancelled:
            self._waiting = [sequence for sequence in self._waiting if not sequence.cancelled]
        arrivals, budget = [], PREFILL_TOKENS
        while self._waiting and self.active + len(arrivals) < self.max_batch and (budget > 0 or not arrivals):
            sequence = self._waiting.pop(0)
            budget -= sequence.pending.shape[1]
            arrivals.append(sequence)
        return cancelled + arrivals

    @torch.no_grad()
    def _join(self, arrivals: list[Sequence]):
        """Slot sequences one by one through their slots; into the batch the others: those that can ride join as
        they are (the next step feeds the rest of their prompt); the rest are prefilled in one forward. One that
        asks for no tokens and no scores ends here (a prompt echoed only)."""
        for sequence in arrivals:
            if sequence.sampling.max_new_tokens == 0 and not sequence.scores_prompt:
                sequence.finish_reason = "length"
                sequence.finish()
        arrivals = [sequence for sequence in arrivals if not sequence.done.is_set()]
        for sequence in [sequence for sequence in arrivals if isinstance(sequence.cache, StaticSlot)]:
            try:
                self.counts["slot_steps"] += 1
                logits = sequence.cache.forward(sequence.pending, sequence.image_inputs)
            except Exception as error:
                sequence.finish(error)
                continue
            sequence.image_inputs = {}  # the image entered the cache with the prompt
            if self._emit([sequence], logits)[0]:
                sequence.finish()
            else:
                self._alone.append(sequence)
        batched = [sequence for sequence in arrivals if not isinstance(sequence.cache, StaticSlot)]
        if scored := [sequence for sequence in batched if sequence.scores_prompt]:
            self._score(scored)
        batched = [sequence for sequence in batched if not sequence.scores_prompt]
        riders = self._batch.riders(batched)
        prefilling = [sequence for sequence in batched if sequence not in set(riders)]
        if prefilling:
            self.counts["prefill_forwards"] += 1
            self.counts["prefill_sequences"] += len(prefilling)
            try:
                rows, logits = self._batch.prefill(prefilling)
            except Exception as error:
                for sequence in prefilling:
                    sequence.finish(error)
            else:
                self._leave([row for row, finished in zip(rows, self._emit(prefilling, logits)) if finished])
        if riders:
            try:
                self._batch.ride(riders)
            except Exception as error:  # out of memory growing the buffers: the batch is as it was
                for sequence in riders:
                    sequence.finish(error)
            else:
                self.counts["riders"] += len(riders)  # the next step feeds their prompts

    @torch.no_grad()
    def _decode(self):
        for sequence in list(self._alone):
            try:
                finished = sequence.cancelled
                if not finished:
                    self.counts["slot_steps"] += 1
                    logits = sequence.cache.forward(torch.tensor([[sequence.tokens[-1]]], device=sequence.pending.device), {})
                    finished = self._emit([sequence], logits)[0]
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
        self.counts["decode_steps"] += 1
        self.counts["decode_rows"] += len(batch.rows)
        try:
            logits = batch.step()
        except Exception as error:
            return batch.fail(error)
        self._leave([index for index, finished in enumerate(self._emit(batch.rows, logits)) if finished])

    def _emit(self, sequences: list[Sequence], logits: torch.Tensor) -> list[bool]:
        """Draws each sequence's next token from its row of `logits` (B, V) and records it, with its log-probability
        for those that asked; whether each one is finished."""
        asking = [row for row, sequence in enumerate(sequences) if sequence.sampling.logprobs is not None]
        # the model's own distribution: before the end tokens of a row short of its min_tokens, and the suppressed
        # ones, are ruled out
        raw = logits[asking].float().log_softmax(dim=-1) if asking else None
        tokens = next_tokens(logits, [sequence.sampling for sequence in sequences], [sequence.generator for sequence in sequences],
                             self.suppress, [sequence.blocked for sequence in sequences],
                             [sequence.penalties for sequence in sequences], [sequence.constraint for sequence in sequences])
        logprobs = [None] * len(sequences)
        if kept := [index for index, row in enumerate(asking) if tokens[row] is not None]:  # a broken row ends without
            found = token_logprobs(raw[kept], [tokens[asking[index]] for index in kept],
                                   [sequences[asking[index]].sampling.logprobs for index in kept])
            for index, logprob in zip(kept, found):
                logprobs[asking[index]] = logprob
        return [sequence.emit(token, logprob) for sequence, token, logprob in zip(sequences, tokens, logprobs)]

    def _score(self, sequences: list[Sequence]):
        """Prefills the sequences whose prompt is scored (see Sequence.scores_prompt): with every position's logits,
        which give each prompt token's log-probability, and the last one its first token (unless it asked for none:
        a prompt scored only). Together, in forwards of at most SCORED_LOGITS logits (all kept at once); a prompt
        longer than that alone is scored a part at a time first (see _score_ahead)."""
        for sequence in sequences:
            if sequence.cache is not None and sequence.cache.get_seq_length():  # the prefix's positions would have no logits
                sequence.finish(ValueError("a prompt to score comes with no cached prefix: its every token is fed"))
            elif sequence.pending.shape[1] * self.vocabulary > SCORED_LOGITS:
                self._score_ahead(sequence)
        group: list[Sequence] = []
        for sequence in sorted((sequence for sequence in sequences if not sequence.done.is_set()), key=lambda each: each.pending.shape[1]):
            if group and (len(group) + 1) * sequence.pending.shape[1] * self.vocabulary > SCORED_LOGITS:
                self._score_together(group)
                group = []
            group.append(sequence)
        if group:
            self._score_together(group)

    def _score_together(self, sequences: list[Sequence]):
        self.counts["prefill_forwards"] += 1
        self.counts["prefill_sequences"] += len(sequences)
        prompts = [sequence.pending[0].tolist() for sequence in sequences]
        try:
            rows, logits = self._batch.prefill(sequences, every_position=True)
        except Exception as error:
            for sequence in sequences:
                sequence.finish(error)
            return
        leaving, answering = [], []
        for row, sequence, ids, scores in zip(rows, sequences, prompts, logits):
            try:
                found = prompt_logprobs(scores, ids, sequence.sampling.prompt_logprobs)
                # after parts scored ahead, the first token's is theirs (the None of a first token is not)
                sequence.prompt_logprobs = found if sequence.prompt_logprobs is None else sequence.prompt_logprobs + found[1:]
            except Exception as error:  # out of memory, say: this sequence fails alone, the batch goes on
                sequence.error = error
                leaving.append(row)
                continue
            if sequence.sampling.max_new_tokens == 0:
                sequence.finish_reason = "length"
                leaving.append(row)
            else:
                answering.append((row, sequence, scores[-1]))
        if answering:
            finished = self._emit([sequence for _, sequence, _ in answering], torch.stack([last for _, _, last in answering]))
            leaving += [row for (row, _, _), done in zip(answering, finished) if done]
        self._leave(leaving)

    def _score_ahead(self, sequence: Sequence):
        """Scores a long prompt's leading parts, each of as many tokens as SCORED_LOGITS allows, one forward each: a
        part is prefilled after those before it (the sequence takes a row, then leaves it with its cache), and its
        logits score its tokens after the first and the next part's first. The last part is left pending, for
        _score_together; on a failure the sequence ends with it."""
        if sequence.image_inputs:  # an image's span is fed whole (ChatEngine refuses such a prompt when too long)
            return
        part = max(1, SCORED_LOGITS // self.vocabulary)
        ids, alternatives = sequence.pending[0].tolist(), sequence.sampling.prompt_logprobs
        whole, fed = sequence.pending, 0
        scored: list = []  # tokens 0 .. fed (the last one not fed yet: it starts the next part)
        for start in range(0, len(ids) - part, part):
            if sequence.cancelled:  # its reader left: the parts after are not scored
                return sequence.finish()
            end = start + part
            sequence.pending = whole[:, start:end]
            self.counts["prefill_forwards"] += 1
            try:
                (row,), (logits,) = self._batch.prefill([sequence], every_position=True)
            except Exception as error:
                return sequence.finish(error)
            try:
                found = prompt_logprobs(logits, ids[start: end + 1], alternatives)  # the next part's first token too
                del logits
                scored += found if start == 0 else found[1:]
                self._batch.remove([row])  # its keys and values go back to its cache: the next part comes after them
                fed = end
            except Exception as error:
                if sequence in self._batch.rows:
                    sequence.error = error
                    return self._leave([self._batch.rows.index(sequence)])
                return sequence.finish(error)  # its row was taken out before the failure (in remove)
        sequence.pending, sequence.prompt_logprobs = whole[:, fed:], scored

    def _leave(self, indices: list[int]):
        if indices:
            leaving = [self._batch.rows[index] for index in indices]
            try:
                self._batch.remove(indices)
            finally:
                # a remove that failed half-way (out of memory) has taken some out already: the batch's fail ends only
                # the rows it still has, so those end here (their cache is theirs, or None)
                for sequence in leaving:
                    if sequence not in self._batch.rows:
                        sequence.finish()
