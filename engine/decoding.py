"""Choosing the next token of every sequence in a batch at once, each with its own temperature, top-p and seed.

The scaling and the nucleus cut are one tensor operation over the batch; only the draw itself is per row, since a
seeded sequence draws from its own generator so that its answer does not depend on who else was in the batch."""

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .structured_output import Structure, rule_out

# Below this a temperature is greedy decoding in all but name, and far below it sampling breaks: float32 rounds
# 1e-300 to 0, logits / temperature overflow to inf, softmax gives NaN, and the multinomial raises inside the
# scheduler's batched step, failing every answer in the batch (one such API request failed 9 of 16 others' streams).
MIN_TEMPERATURE = 1e-5
# Any top_p below the most likely token's probability (at least 1 / vocabulary) keeps that token alone; a floor far
# below any vocabulary's share changes no answer, but keeps float32 from rounding top_p to 0, which keeps no token.
MIN_TOP_P = 1e-30
# vLLM's bounds are (0, inf); past a few every token said is as good as ruled out, and a tiny one (1e-45) made a
# score infinite
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
MAX_LOGPROBS = 20  # alternatives per token, at most (OpenAI's top_logprobs and vLLM's default max_logprobs)
SCORED_ROWS = 256  # prompt positions whose log-softmax is taken at once: (256, 32k) floats are 32 MB


class NonFiniteScores(RuntimeError):
    """A sequence's next-token scores were NaN or infinite (a float16 model's activations overflow most often): it
    ends with this error, and the other sequences of its batch go on."""


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens; temperature 0 is greedy. `top_k` (0: no limit) and `min_p` (0: none) cut
    the candidates as vLLM's and transformers' samplers do; `min_tokens` keeps the end token (and stop strings) from
    ending the answer before that many tokens; `ignore_eos` decodes on through end tokens up to `max_new_tokens`
    (benchmarks ask for it to get answers of a fixed length)."""
    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    # not how tokens are picked but what is told of them, as vLLM's SamplingParams carry it: per generated token its
    # log-probability and this many most likely alternatives' (None: nothing computed), and the same per prompt token
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool = False  # the prompt's token ids too, with the answer's first tokens (vLLM's return_token_ids)
    # what the sequence's own rules add to its scores (engine.penalties): OpenAI's, and vLLM's repetition_penalty
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    structure: Structure | None = None  # what the answer is held to (engine.structured_output)
    # vLLM's: tokens that end the answer as its end token does (also with ignore_eos; blocked too before min_tokens),
    # their text left out unless `include_stop_str_in_output`, which keeps a stop string's text in the answer too
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # vLLM's: an answer's special tokens (its own stop tokens too) left out of its text
    # vLLM's, also engine.penalties': the only tokens it may draw (None: any), and token sequences it may not end
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature is {self.temperature}; it must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}; it must be in (0, 1]")
        if self.max_new_tokens < 0:  # 0: nothing generated (a prompt echoed, or scored, only)
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; it must be at least 0")
        if not 0 <= self.top_k < 2**31:  # one tensor of the batch's top_k: a row's overflow would fail all rows
            raise ValueError(f"top_k is {self.top_k}; it must be between 0 (no limit) and 2**31 - 1")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p is {self.min_p}; it must be between 0 and 1")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens is {self.min_tokens}; it must be between 0 and max_new_tokens ({self.max_new_tokens})")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= (value := getattr(self, name)) <= 2:
                raise ValueError(f"{name} is {value}; it must be between -2 and 2")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty is {self.repetition_penalty}; it must be between {MIN_REPETITION_PENALTY} "
                             f"and {MAX_REPETITION_PENALTY}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("a logit_bias is between -100 and 100")
        for name in ("logprobs", "prompt_logprobs"):
            if (count := getattr(self, name)) is not None and not 0 <= count <= MAX_LOGPROBS:
                raise ValueError(f"{name} is {count}; it must be between 0 and {MAX_LOGPROBS}")
        if any(token < 0 for token in self.stop_token_ids):
            raise ValueError("a stop token id is at least 0")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or min(self.allowed_token_ids) < 0):
            raise ValueError("allowed_token_ids names at least one token, each id at least 0")
        if any(not word or min(word) < 0 for word in self.bad_words):
            raise ValueError("a bad word is at least one token, each id at least 0")
        if self.structure is not None and self.min_tokens:  # an answer its grammar ends would have no token left to draw
            raise ValueError("min_tokens cannot be combined with a structured output, which ends where its grammar does")
        if self.temperature < MIN_TEMPERATURE:  # whoever asks (the API, the app, a caller of the engine)
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "top_p", max(self.top_p, MIN_TOP_P))

    def generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (its raw scores' log-softmax, before temperature and cuts, as
    vLLM reports them) and the `top` most likely tokens' (id, log-probability), most likely first; a prompt
    token's `rank` among all (1: the likeliest; vLLM's prompt_logprobs show it)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], alternatives: list[int], ranked: bool = False) -> list[TokenLogprob]:
    """For each row of `logprobs` (B, V: the log-softmax of the model's scores), its token's log-probability and its
    `alternatives[i]` most likely ones'; `ranked`: its rank too."""
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0]
    # vLLM's rank: how many tokens are at least as likely, the token itself among them
    ranks = (logprobs >= chosen[:, None]).sum(dim=-1).tolist() if ranked else [None] * len(tokens)
    chosen = chosen.tolist()
    most = max(alternatives, default=0)
    values, ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(token, logprob, tuple(zip(ids[row][:count], values[row][:count])), rank)
            for row, (token, logprob, count, rank) in enumerate(zip(tokens, chosen, alternatives, ranks))]


def prompt_logprobs(logits: torch.Tensor, ids: list[int], alternatives: int) -> list[TokenLogprob | None]:
    """Per prompt token its log-probability after the tokens before it (`logits` (T, V): the prompt's, position by
    position); None for the first, which nothing comes before. In slices of SCORED_ROWS positions: a float32 copy of
    a long prompt's whole (T, V) would cost gigabytes."""
    scored: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, SCORED_ROWS):
        end = min(start + SCORED_ROWS, len(ids) - 1)
        rows = logits[start:end].float()
        if (broken := rows.isnan().any(dim=-1) | rows.isposinf().any(dim=-1)).any():
            raise NonFiniteScores(f"the model's scores after the prompt's token {start + int(broken.nonzero()[0])} were NaN or "
                                  "infinite; if the model runs in float16, bfloat16 or float32 may not overflow")
        scored += token_logprobs(rows.log_softmax(dim=-1), ids[start + 1: end + 1], [alternatives] * (end - start), ranked=True)
    return scored


def truncated(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities with, per row, the candidates outside its cut zeroed, in vLLM's order: those below
    `min_p` times the most likely token's probability and those past the `top_k` most likely (0: none) go first,
    then `top_p` keeps the smallest set holding that share of what is left (transformers' generate cuts top_p
    before min_p, which keeps more where both cut; the API's clients speak vLLM's dialect). The most likely token
    always stays."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    cut = ((ranks[None, :] >= top_k[:, None]) & (top_k[:, None] > 0)) | (sorted_probs < min_p[:, None] * sorted_probs[:, :1])
    sorted_probs[cut] = 0
    # the share of the mass left, for the rows that lost some (the others keep top_p over their whole mass, unrounded)
    kept = torch.where(cut.any(dim=-1), sorted_probs.sum(dim=-1), 1.0)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs[before >= top_p[:, None] * kept[:, None]] = 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


@torch.no_grad()
def next_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None],
                suppress: list[int], blocked: list[Collection[int]] | None = None,
                penalties: list | None = None, constraints: list | None = None) -> list[int | None]:
    """One token per row of `logits` (B, V), row i following samplings[i] and drawing from generators[i] (None: the
    global generator), its scores adjusted first by its own `penalties[i]` (engine.penalties: logit bias, repetition,
    frequency and presence penalties; None: none), never one of `suppress` nor of its own `blocked[i]` (the end
    tokens of a sequence short of its min_tokens), and only one its `constraints[i]` allows (a structured output's
    grammar, engine.structured_output; None: any). None for a row whose scores hold a NaN or +inf, or that has no
    token left. Such a row is not drawn from (the multinomial would raise for the whole batch, failing every other
    sequence's answer), and its argmax would be noise."""
    masked = bool(suppress) or any(blocked or []) or any(penalties or []) or any(constraints or [])
    logits = logits.to(torch.float32, copy=masked)  # the caller's scores stay as they are (its log-probabilities)
    for row, adjustments in enumerate(penalties or []):
        if adjustments is not None:
            adjustments.apply(logits[row])
    # after a row's own rules (a tiny repetition penalty can make a score infinite: that row ends, not the batch),
    # before suppress writes its -inf
    broken = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1)
    if suppress:
        logits[:, suppress] = -float("inf")
    for row, ids in enumerate(blocked or []):
        if ids:
            logits[row, list(ids)] = -float("inf")
    if any(constraints or []):
        rule_out(logits, constraints)
    tokens = logits.argmax(dim=-1)
    if masked:  # a row whose grammar or rules left no token: its best is -inf (a draw from it would fail the batch)
        broken |= logits.gather(-1, tokens[:, None])[:, 0].isneginf()
    sampled = [row for row, sampling in enumerate(samplings) if sampling.temperature > 0]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([samplings[row].temperature for row in sampled], device=logits.device)
        top_p = torch.tensor([samplings[row].top_p for row in sampled], device=logits.device)
        top_k = torch.tensor([samplings[row].top_k for row in sampled], device=logits.device)
        min_p = torch.tensor([samplings[row].min_p for row in sampled], device=logits.device)
        # a broken row draws from even scores (never read): telling which rows are broken first would wait for a GPU
        scores = torch.where(broken[rows, None], 0.0, logits[rows]) / temperature[:, None]
        probs = torch.softmax(scores, dim=-1)
        # the API's default (top_p 1, no top_k or min_p) cuts nothing: the sort of a 32k vocabulary costs more than the draw
        if any(samplings[row].top_p < 1 or samplings[row].top_k or samplings[row].min_p for row in sampled):
            probs = truncated(probs, top_p, top_k, min_p)
        for index, row in enumerate(sampled):
            tokens[row] = torch.multinomial(probs[index], 1, generator=generators[row])[0]
    return [None if token < 0 else token for token in torch.where(broken, -1, tokens).tolist()]
