"""An answer's text as its tokens arrive: detokenizing, stop strings, and what may be shown so far.

Apart from the engine that makes the tokens: llava-serve runs the model in a process of its own and turns tokens
into text in the HTTP process (as vLLM's front end detokenizes for its engine core), so that this per-token Python
does not take the model's process from the scheduler. In one process (the Gradio app, `--single-process`),
ChatEngine.generate runs the same code over its own tokens."""

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass


@dataclass
class Progress:
    """The answer so far and what it cost: `prompt_tokens` in all, `cached_tokens` of them reused from earlier
    requests, `completion_tokens` generated; `finish_reason` ("stop" or "length") on the last one only."""
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class Tokens:
    """What arrived of an answer since the last: `new` token ids; on the last one, the scheduler's `finish_reason`
    ("stop" at an end token, "length" at the limit)."""
    new: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str | None = None


class AnswerText:
    """The growing text of one answer, fed what arrives (`add`): the same Progress as_text yields, for a reader that
    is not an iterator (llava-serve's event loop, which the tokens reach without a thread of their own). `finished`
    once a Progress carried a finish reason: the engine's, or "stop" at a stop string (cut from the text; the caller
    then cancels the rest)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(word for word in stop if word)  # an empty one is in every text, before a single token
        self.tokens: list[int] = []
        self.finished = False

    def add(self, arrived: Tokens) -> Progress:
        known = len(self.tokens)
        self.tokens += arrived.new
        text = _text(self.tokenizer, self.tokens)
        counts = {"prompt_tokens": arrived.prompt_tokens, "cached_tokens": arrived.cached_tokens}
        if any(word in text for word in self.stop):
            self.tokens, text = _until_stop(self.tokenizer, self.tokens, known, self.stop)
            self.finished = True
            return Progress(text, completion_tokens=len(self.tokens), finish_reason="stop", **counts)
        if arrived.finish_reason is not None:
            self.finished = True
            return Progress(text, completion_tokens=len(self.tokens), finish_reason=arrived.finish_reason, **counts)
        return Progress(shown(text, self.stop), completion_tokens=len(self.tokens), **counts)


def as_text(arrivals: Iterator[Tokens], tokenizer, stop: tuple[str, ...] = ()) -> Iterator[Progress]:
    """The growing answer of `arrivals`; a stop string ends it (cut from the text, `arrivals` closed: that cancels
    the rest). Each Progress holds back what could still become a stop string or half a character."""
    text = AnswerText(tokenizer, stop)
    with closing(arrivals):
        for arrived in arrivals:
            yield text.add(arrived)
            if text.finished:
                return


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _until_stop(tokenizer, tokens: list[int], known: int, stop: tuple[str, ...]) -> tuple[list[int], str]:
    """The fewest tokens (more than `known`, whose text held no stop string) whose text holds a stop string, and
    that text cut before it."""
    for count in range(known + 1, len(tokens) + 1):
        text = _text(tokenizer, tokens[:count])
        cuts = [text.find(word) for word in stop if word in text]
        if cuts:
            return tokens[:count], text[: min(cuts)].rstrip()
    raise AssertionError("the stop string was in the whole text")


def shown(text: str, stops: tuple[str, ...]) -> str:
    """`text` less its longest suffix that is a proper prefix of some stop string (so a 200-character stop string
    that never comes holds back nothing of an answer that does not end like its beginning), less half characters
    (U+FFFD of an incomplete byte sequence) and trailing spaces, which the final answer may drop."""
    cut = len(text)
    for stop in filter(None, stops):  # an empty stop string matches at once, elsewhere
        start = max(0, len(text) - len(stop) + 1)  # a tail as long as the stop string would have matched
        while (start := text.find(stop[0], start)) != -1 and start < cut:
            if stop.startswith(text[start:]):
                cut = start  # the earliest such start is the longest such tail
                break
            start += 1
    return text[:cut].rstrip("\ufffd").rstrip()
