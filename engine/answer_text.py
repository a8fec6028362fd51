"""An answer's text as its tokens arrive: detokenizing, stop strings, and what may be shown so far.

Apart from the engine that makes the tokens: llava-serve runs the model in a process of its own and turns tokens
into text in the HTTP process (as vLLM's front end detokenizes for its engine core), so that this per-token Python
does not take the model's process from the scheduler. In one process (the Gradio app, `--single-process`),
ChatEngine.generate runs the same code over its own tokens."""

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

from .decoding import Sampling, TokenLogprob


@dataclass
class Progress:
    """The answer so far and what it cost: `prompt_tokens` in all, `cached_tokens` of them reused from earlier
    requests, `completion_tokens` generated; `finish_reason` ("stop" or "length") on the last one only. When they
    were asked for: `tokens` (the answer's ids) and their `logprobs` (the first `completion_tokens` of each count),
    every prompt token's `prompt_logprobs` (None for the first), and `ended_by`, the end token that finished it.
    `stop_reason` (vLLM's): the stop string or the request's own stop token id that ended it; None for the model's
    end token or the limit.
    `generated_tokens`: what usage counts, the end token included when one was drawn (as vLLM's, whose max_tokens
    counts it too: the answer's tokens and its end token are at most max_tokens); `end_token`: its id. With
    Sampling.return_token_ids, `prompt_ids`: the prompt's token ids as the model read them."""
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    tokens: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    ended_by: TokenLogprob | None = None
    end_drawn: bool = False
    stop_reason: int | str | None = None
    end_token: int | None = None
    prompt_ids: list[int] | None = None

    @property
    def generated_tokens(self) -> int:
        return self.completion_tokens + self.end_drawn


@dataclass
class Tokens:
    """What arrived of an answer since the last: `new` token ids; on the last one, the scheduler's `finish_reason`
    ("stop" at an end token, "length" at the limit). With log-probabilities asked for: `logprobs` (one per new
    token), `prompt_logprobs` (on the first), `ended_by` (on the last, if an end token finished it), `end_drawn`
    (on the last: an end token finished it, which `new` leaves out; `end_token` its id), `stop_reason` (on the last:
    the request's own stop token id that finished it, see Sequence.stop_reason); with Sampling.return_token_ids,
    `prompt_ids` (on the first: the prompt's ids as the model read them, its images' tokens laid out)."""
    new: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    ended_by: TokenLogprob | None = None
    end_drawn: bool = False
    stop_reason: int | None = None
    end_token: int | None = None
    prompt_ids: list[int] | None = None


class AnswerText:
    """The growing text of one answer, fed what arrives (`add`): the same Progress as_text yields, for a reader that
    is not an iterator (llava-serve's event loop, which the tokens reach without a thread of their own). `finished`
    once a Progress carried a finish reason: the engine's, or "stop" at a stop string (cut from the text; the caller
    then cancels the rest).

    A chat answer's text is stripped of the spaces around it. With `context` (the prompt's last token ids, see
    `continuation`) the text is a raw continuation, as a text-completion API returns it: exactly what follows the
    prompt, its leading space included, which a tokenizer that drops the first token's space on decoding would lose
    if the answer's tokens were decoded alone.

    From `sampling`, as vLLM's detokenizer reads its SamplingParams: with `min_tokens`, a stop string ends the answer
    only where it ends past the text of its first `min_tokens` tokens, as vLLM checks stop strings only once an
    answer has that many; `include_stop_str_in_output` keeps the stop string that ended the answer in its text;
    `skip_special_tokens` false keeps special tokens' text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] | None = None, sampling: Sampling | None = None):
        sampling = sampling or Sampling()
        self.tokenizer = tokenizer
        self.stop = tuple(word for word in stop if word)  # an empty one is in every text, before a single token
        self.keep_stop, self.skip_special = sampling.include_stop_str_in_output, sampling.skip_special_tokens
        min_tokens = sampling.min_tokens
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None  # with the tokens, if they came with theirs
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_ids: list[int] | None = None
        self.finished = False
        self._context = context
        self.min_tokens, self._floor = min_tokens, None if min_tokens else 0  # the floor: that text's length
        self._before = None if context is None else self._decode(context)

    def text_of(self, tokens: list[int]) -> str:
        if self._context is None:
            return self._decode(tokens).strip()
        whole = self._decode(self._context + tokens)
        # the prompt's text is a prefix of the whole but where its last bytes were half a character the answer completes
        return whole[len(self._before):] if whole.startswith(self._before) else self._decode(tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, arrived: Tokens) -> Progress:
        known = len(self.tokens)
        self.tokens += arrived.new
        if arrived.logprobs is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs += arrived.logprobs  # in place, as the tokens: a Progress reads its first completion_tokens
        if arrived.prompt_logprobs is not None:
            self.prompt_logprobs = arrived.prompt_logprobs
        if arrived.prompt_ids is not None:
            self.prompt_ids = arrived.prompt_ids
        text = self.text_of(self.tokens)
        counts = {"prompt_tokens": arrived.prompt_tokens, "cached_tokens": arrived.cached_tokens, "tokens": self.tokens,
                  "logprobs": self.logprobs, "prompt_logprobs": self.prompt_logprobs, "prompt_ids": self.prompt_ids}
        if self._stop_in(text, len(self.tokens)) is not None:
            self.tokens, text, word = self._until_stop(known)
            if self.logprobs is not None:
                self.logprobs = self.logprobs[: len(self.tokens)]
            self.finished = True
            return Progress(text, completion_tokens=len(self.tokens), finish_reason="stop", stop_reason=word,
                            **{**counts, "tokens": self.tokens, "logprobs": self.logprobs})
        if arrived.finish_reason is not None:
            self.finished = True
            return Progress(text, completion_tokens=len(self.tokens), finish_reason=arrived.finish_reason,
                            ended_by=arrived.ended_by, end_drawn=arrived.end_drawn, stop_reason=arrived.stop_reason,
                            end_token=arrived.end_token, **counts)
        return Progress(shown(text, self.stop, strip=self._context is None), completion_tokens=len(self.tokens), **counts)

    def _until_stop(self, known: int) -> tuple[list[int], str, str]:
        """The fewest tokens (more than `known`, whose text held no stop string) whose text holds a stop string, that
        text cut before it (after it, with `keep_stop`), and the stop string."""
        for count in range(max(known, self.min_tokens) + 1, len(self.tokens) + 1):
            text = self.text_of(self.tokens[:count])
            if (found := self._stop_in(text, count)) is not None:
                at, word = found
                if self.keep_stop:
                    return self.tokens[:count], text[: at + len(word)], word
                text = text[:at]
                return self.tokens[:count], text.rstrip() if self._context is None else text, word
        raise AssertionError("the stop string was in the whole text")

    def _stop_in(self, text: str, count: int) -> tuple[int, str] | None:
        """Where the first stop string that counts starts in `text` (the text of the first `count` tokens), and which
        it is; None if none is there."""
        if not self.stop or count <= self.min_tokens:
            return None
        if self._floor is None:
            self._floor = len(self.text_of(self.tokens[: self.min_tokens]))
        found = [(at, word) for word in self.stop if (at := text.find(word, max(0, self._floor - len(word) + 1))) >= 0]
        return min(found, key=lambda each: each[0], default=None)


def continuation(prompt_ids: list[int]) -> list[int]:
    """The prompt's last tokens that a continuation's text is decoded after (AnswerText's `context`): enough for a
    tokenizer's rules about the first token's space and for a character split across tokens."""
    return list(prompt_ids[-6:])


def as_text(arrivals: Iterator[Tokens], tokenizer, stop: tuple[str, ...] = (), context: list[int] | None = None,
            sampling: Sampling | None = None) -> Iterator[Progress]:
    """The growing answer of `arrivals`; a stop string ends it (cut from the text, `arrivals` closed: that cancels
    the rest). Each Progress holds back what could still become a stop string or half a character. `context` and
    `sampling`: see AnswerText."""
    text = AnswerText(tokenizer, stop, context, sampling)
    with closing(arrivals):
        for arrived in arrivals:
            yield text.add(arrived)
            if text.finished:
                return


def chat_context(sampling, prompt=None) -> list[int] | None:
    """The `context` of a chat answer's text: none (stripped, as LLaVA's answers are), or, for one held to a
    structured output, an empty one (the raw text: a choice of " yes" or a regex's trailing newline kept as the
    grammar made it, as vLLM's are); for a `prompt` (engine.prompts.Prompt) that continues its last message, that
    message's last tokens (the text that follows them, raw, its leading space kept: as a completion's)."""
    if prompt is not None and prompt.continued is not None:
        return prompt.continued
    return [] if sampling.structure is not None else None


def shown(text: str, stops: tuple[str, ...], strip: bool = True) -> str:
    """`text` less its longest suffix that is a proper prefix of some stop string (so a 200-character stop string
    that never comes holds back nothing of an answer that does not end like its beginning), less half characters
    (U+FFFD of an incomplete byte sequence) and, with `strip` (a chat answer's, which ends stripped), trailing
    spaces, which the final answer may drop."""
    cut = len(text)
    for stop in filter(None, stops):  # an empty stop string matches at once, elsewhere
        start = max(0, len(text) - len(stop) + 1)  # a tail as long as the stop string would have matched
        while (start := text.find(stop[0], start)) != -1 and start < cut:
            if stop.startswith(text[start:]):
                cut = start  # the earliest such start is the longest such tail
                break
            start += 1
    text = text[:cut].rstrip("\ufffd")
    return text.rstrip() if strip else text
