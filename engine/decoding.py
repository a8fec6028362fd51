"""Choosing the next token of every sequence in a batch at once, each with its own temperature, top-p and seed.

The scaling and the nucleus cut are one tensor operation over the batch; only the draw itself is per row, since a
seeded sequence draws from its own generator so that its answer does not depend on who else was in the batch."""

from dataclasses import dataclass

import torch

# Below this a temperature is greedy decoding in all but name, and far below it sampling breaks: float32 rounds
# 1e-300 to 0, logits / temperature overflow to inf, softmax gives NaN, and the multinomial raises inside the
# scheduler's batched step, failing every answer in the batch (one such API request failed 9 of 16 others' streams).
MIN_TEMPERATURE = 1e-5
# Any top_p below the most likely token's probability (at least 1 / vocabulary) keeps that token alone; a floor far
# below any vocabulary's share changes no answer, but keeps float32 from rounding top_p to 0, which keeps no token.
MIN_TOP_P = 1e-30


class NonFiniteScores(RuntimeError):
    """A sequence's next-token scores were NaN or infinite (a float16 model's activations overflow most often): it
    ends with this error, and the other sequences of its batch go on."""


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens; temperature 0 is greedy."""
    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    seed: int | None = None

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature is {self.temperature}; it must be between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}; it must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; it must be at least 1")
        if self.temperature < MIN_TEMPERATURE:  # whoever asks (the API, the app, a caller of the engine)
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "top_p", max(self.top_p, MIN_TOP_P))

    def generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device).manual_seed(self.seed)


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(B, V) probabilities with, per row, everything outside the smallest set holding `top_p` of the mass zeroed
    (the most likely token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs[before >= top_p[:, None]] = 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


@torch.no_grad()
def next_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None],
                suppress: list[int]) -> list[int | None]:
    """One token per row of `logits` (B, V), row i following samplings[i] and drawing from generators[i] (None: the
    global generator); None for a row whose scores hold a NaN or +inf. Such a row is not drawn from (the multinomial
    would raise for the whole batch, failing every other sequence's answer), and its argmax would be noise."""
    logits = logits.float()
    broken = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1)  # before suppress writes its -inf
    if suppress:
        logits[:, suppress] = -float("inf")
    tokens = logits.argmax(dim=-1)
    sampled = [row for row, sampling in enumerate(samplings) if sampling.temperature > 0]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([samplings[row].temperature for row in sampled], device=logits.device)
        top_p = torch.tensor([samplings[row].top_p for row in sampled], device=logits.device)
        # a broken row draws from even scores (never read): telling which rows are broken first would wait for a GPU
        scores = torch.where(broken[rows, None], 0.0, logits[rows]) / temperature[:, None]
        probs = nucleus(torch.softmax(scores, dim=-1), top_p)
        for index, row in enumerate(sampled):
            tokens[row] = torch.multinomial(probs[index], 1, generator=generators[row])[0]
    return [None if token < 0 else token for token in torch.where(broken, -1, tokens).tolist()]
