"""What a sequence's own sampling rules add to its next-token scores before it draws: OpenAI's `logit_bias`,
`frequency_penalty` and `presence_penalty`, and vLLM's (and transformers') `repetition_penalty`, in vLLM's order:
the bias first, then the penalties; and vLLM's token rules, which rule tokens out (their order does not matter):
`allowed_token_ids` (every other token), `bad_words` (a word's last token where the answer ends with the rest of
it, as transformers' NoBadWordsLogitsProcessor and vLLM's: a one-token word always).

- logit_bias: a number added to the named tokens' scores (-100 rules a token out, 100 all but forces it);
- repetition_penalty p: every token of the prompt or the answer so far has its score divided by p where it is
  positive and multiplied by p where it is negative (transformers' RepetitionPenaltyLogitsProcessor, vLLM's);
- frequency_penalty f and presence_penalty q: a token the answer has said n times loses f * n + q * (n > 0)
  (OpenAI's; the prompt's tokens do not count).

Each sequence keeps the counts of what it said in one tensor of the vocabulary's size, made at its first draw and
added to as it goes (one indexed addition per token): nothing is recounted per step."""

import torch

from .decoding import Sampling


def bad_word_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of `words` as an answer would say them, as vLLM tokenizes bad words: each as it is and
    after a space (mid-sentence, where most tokenizers fold the space into the word's first token), distinct ones."""
    found: dict[tuple[int, ...], None] = {}
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            if ids := tuple(tokenizer(text, add_special_tokens=False)["input_ids"]):
                found[ids] = None
    return tuple(found)


class Penalties:
    """The score adjustments of one sequence: `prompt` its prompt's token ids (the repetition penalty counts them)."""

    def __init__(self, sampling: Sampling, prompt: list[int]):
        self.sampling, self.prompt = sampling, prompt
        # made at the first `apply`, which comes before the first token is said (`add`)
        self.counts: torch.Tensor | None = None  # (V,) how often the answer said each token
        self.seen: torch.Tensor | None = None  # (V,) True for each token of the prompt or the answer (repetition only)
        self.ruled_out: torch.Tensor | None = None  # (V,) True for each token never drawn (allowed_token_ids, one-token bad words)
        self.said: list[int] = []  # the answer's tokens: the longer bad words' beginnings are looked for at its end
        self._longer = [word for word in sampling.bad_words if len(word) > 1]

    @staticmethod
    def wanted(sampling: Sampling) -> bool:
        return bool(sampling.logit_bias or sampling.frequency_penalty or sampling.presence_penalty
                    or sampling.repetition_penalty != 1 or sampling.allowed_token_ids is not None or sampling.bad_words)

    def add(self, token: int):
        """A token the sequence said (after the draw whose `apply` made the counts)."""
        self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self._longer:
            self.said.append(token)

    def apply(self, scores: torch.Tensor):
        """Adjusts one row of float32 scores (V,) in place."""
        if self.counts is None:
            self._made(scores)
        sampling = self.sampling
        if sampling.logit_bias:
            ids, biases = self._bias
            scores[ids] += biases
        if sampling.repetition_penalty != 1:
            penalty = sampling.repetition_penalty
            # over the whole row: a boolean mask's indexing would wait for a GPU at every step
            scores.copy_(torch.where(self.seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores))
        if sampling.frequency_penalty or sampling.presence_penalty:
            scores -= sampling.frequency_penalty * self.counts + sampling.presence_penalty * (self.counts > 0)
        if self.ruled_out is not None:
            scores.masked_fill_(self.ruled_out, -float("inf"))
        said = self.said
        if ending := [word[-1] for word in self._longer  # the last token first: most words end nowhere near
                      if said and said[-1] == word[-2] and tuple(said[max(0, len(said) - len(word) + 1):]) == word[:-1]]:
            scores[ending] = -float("inf")

    def _made(self, scores: torch.Tensor):
        size, device = scores.shape[-1], scores.device
        self.counts = torch.zeros(size, dtype=torch.float32, device=device)
        if self.sampling.repetition_penalty != 1:
            self.seen = torch.zeros(size, dtype=torch.bool, device=device)
            if self.prompt:
                self.seen[torch.tensor(self.prompt, device=device)] = True
        single = [word[0] for word in self.sampling.bad_words if len(word) == 1 and word[0] < size]
        if self.sampling.allowed_token_ids is not None or single:
            if self.sampling.allowed_token_ids is None:
                self.ruled_out = torch.zeros(size, dtype=torch.bool, device=device)
            else:
                self.ruled_out = torch.ones(size, dtype=torch.bool, device=device)
                self.ruled_out[torch.tensor([token for token in self.sampling.allowed_token_ids if token < size], dtype=torch.long, device=device)] = False
            if single:
                self.ruled_out[torch.tensor(single, dtype=torch.long, device=device)] = True
        ids = [token for token, _ in self.sampling.logit_bias]
        self._bias = (torch.tensor(ids, dtype=torch.long, device=device),
                      torch.tensor([bias for _, bias in self.sampling.logit_bias], dtype=torch.float32, device=device))
