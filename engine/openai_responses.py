"""OpenAI's chat-completions and completions formats, the answering side: a response's identity and its objects,
whole or as a stream's chunks, each choice's text, usage and token log-probabilities (laid out by token_logprobs).
No HTTP here (that is server.py)."""

import time
import uuid

from .answer_text import Progress
from .token_logprobs import TokenTexts, chat_logprobs, completion_logprobs, joined, prompt_logprobs_layout


def usage(*progresses: Progress, choices: int = 1) -> dict:
    """The usage of a request's answers (prompt-major: prompt i's choice j is answer i * choices + j), each prompt's
    tokens counted once however many choices it has, as OpenAI's and vLLM's."""
    prompts = progresses[::choices]
    prompt, completion = sum(each.prompt_tokens for each in prompts), sum(each.generated_tokens for each in progresses)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(each.cached_tokens for each in prompts)}}


class _Told:
    """What a stream has sent of one choice: its tokens' log-probabilities so far (`tokens`), the texts those tokens
    were named by (token_logprobs.TokenTexts, which follows them) and the offset in the choice's text after them."""

    def __init__(self, texts: TokenTexts | None = None, offset: int = 0):
        self.tokens, self.texts, self.offset = 0, texts, offset


class ChatCompletion:
    """One /v1/chat/completions response's identity, and its objects: the whole completion, or its stream's chunks
    (`opening`, a `delta` per new text, `ending`, `usage_chunk`), each of choice `index` (several: `n`, or a
    completion's several prompts). With `with_usage` every chunk has the usage key, as OpenAI's do when a stream's
    usage was asked for: only the last one a value. With `logprobs` (the request asked for them, so its Progress
    carries them) each choice, and each chunk of a stream, has its tokens' log-probabilities, their texts by
    `tokenizer` (or `token_id:N` names, `as_ids`). `choices`: per prompt (n). With `continuous` (vLLM's
    continuous_usage_stats) each chunk's usage is its choice's so far. `echo`: the text each choice's content begins
    with (vLLM's echo of a last assistant message that the answer continues), sent with a stream's opening. Each
    choice, and a stream's last chunk of one, has vLLM's `stop_reason`: the stop string or the request's stop token
    id that ended it (None otherwise). With `token_ids` (vLLM's return_token_ids) the response has its prompt's
    `prompt_token_ids` (a stream's first chunk) and each choice its `token_ids` (each chunk those since the last),
    the end token that finished it included, as vLLM's list it. With `prompt_logprobs` (vLLM's: a count of
    alternatives) the response has its prompt's tokens' log-probabilities in vLLM's layout (a stream's first chunk),
    see token_logprobs.prompt_logprobs_layout."""
    prefix, kind, chunk_kind = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, with_usage: bool = False, tokenizer=None, logprobs: bool = False, as_ids: bool = False,
                 choices: int = 1, continuous: bool = False, echo: str = "", token_ids: bool = False,
                 prompt_logprobs: int | None = None, role: str = "assistant"):
        self.id, self.model, self.created = f"{self.prefix}-{uuid.uuid4().hex}", model, int(time.time())
        self.role = role  # the answer's (ChatRequest.response_role)
        self.echo_text, self.token_ids, self.prompt_logprobs = echo, token_ids, prompt_logprobs
        self._ids_told: dict[int, int] = {}  # a stream's: per choice, how many of its tokens' ids were sent
        self._prompt_told: set[int] = set()  # a stream's: the choices whose prompt's facts were sent (a chat's: 0, once)
        self._facts: dict[int, dict] = {}  # per choice, what was asked of its prompt (prompt_facts)
        self.with_usage, self.choices, self.continuous = with_usage, choices, continuous
        self.logprobs, self.tokenizer, self.as_ids = logprobs, tokenizer, as_ids
        self._told: dict[int, _Told] = {}  # a stream's, per choice

    def whole(self, *progresses: Progress) -> dict:
        """The whole response: a choice per answer, their usage summed."""
        choices = [self._choice(self._text(index, progress), progress.finish_reason, whole=True, index=index,
                                logprobs=self._whole_logprobs(index, progress) if self.logprobs else None,
                                stop_reason=progress.stop_reason)
                   for index, progress in enumerate(progresses)]
        response = {**self._head(self.kind), "choices": choices, "usage": usage(*progresses, choices=self.choices)}
        for index, (choice, progress) in enumerate(zip(choices, progresses)):
            self._with_ids(response, choice, index, progress, last=True)
        return response

    @property
    def heavy(self) -> bool:
        """Whether laying out the response names many tokens (log-probabilities: its tokens' and their alternatives',
        or every prompt token's), which can take seconds: not on the event loop (see `prompt_facts`)."""
        return bool(self.logprobs) or self.prompt_logprobs is not None

    def prompt_facts(self, index: int, progress: Progress) -> dict:
        """What was asked of choice `index`'s prompt (its ids, its tokens' log-probabilities), made once: a stream
        makes it in a worker thread before the choice's first chunk, which then only reads it."""
        if index not in self._facts:
            facts = {}
            if self.token_ids:
                facts["prompt_token_ids"] = self._prompt_of(index, progress)
            if self.prompt_logprobs is not None:
                texts = TokenTexts(self.tokenizer, as_ids=self.as_ids)
                facts["prompt_logprobs"] = prompt_logprobs_layout(texts, self._prompt_of(index, progress), progress.prompt_logprobs,
                                                                  self.prompt_logprobs)
            self._facts[index] = facts
        return self._facts[index]

    def _with_ids(self, response: dict, choice: dict, index: int, progress: Progress, last: bool, opening: bool = False):
        """Adds to `response` (a whole one, or a chunk) what was asked of the prompt of `choice` (its `index`) where
        it was not sent yet, and the choice's token ids not sent yet; a stream's `opening` (before the choice's
        text) has no token ids of the answer."""
        told = index if self.facts_per_choice else 0  # a chat's prompt, one for all its choices, is told once
        if told not in self._prompt_told:
            self._prompt_told.add(told)
            (choice if self.facts_per_choice else response).update(self.prompt_facts(index, progress))
        if not self.token_ids:
            return
        start = self._ids_told.get(index, 0)
        end = start if opening else progress.completion_tokens
        self._ids_told[index] = end
        ids = list(progress.tokens[start:end])
        if last and progress.end_drawn and progress.end_token is not None:
            ids.append(progress.end_token)
        choice["token_ids"] = ids

    facts_per_choice = False  # a chat's prompt, one for all its choices, is the response's (vLLM's layout)

    def _prompt_of(self, index: int, progress: Progress) -> list[int]:
        return progress.prompt_ids

    def opening(self, progress: Progress, index: int = 0) -> dict | None:
        """Choice `index`'s first chunk, before its text (`progress`: its first)."""
        return self._chunk({"role": self.role, "content": self.echo_text}, index=index, progress=progress, opening=True)

    def delta(self, text: str, progress: Progress, index: int = 0) -> dict:
        return self._chunk({"content": text}, index=index, logprobs=self._stream_logprobs(progress, index), progress=progress)

    def ending(self, progress: Progress, index: int = 0) -> dict:
        return self._chunk({}, progress.finish_reason, index, logprobs=self._stream_logprobs(progress, index, last=True),
                           progress=progress)

    def usage_chunk(self, *progresses: Progress) -> dict:
        return {**self._head(self.chunk_kind), "choices": [], "usage": usage(*progresses, choices=self.choices)}

    def _text(self, index: int, progress: Progress) -> str:
        return self.echo_text + progress.text

    def _whole_logprobs(self, index: int, progress: Progress) -> dict:
        count = progress.completion_tokens
        texts = TokenTexts(self.tokenizer, as_ids=self.as_ids)
        return {"content": chat_logprobs(texts, progress.tokens[:count], progress.logprobs[:count]), "refusal": None}

    def _stream_logprobs(self, progress: Progress, index: int, last: bool = False) -> dict | None:
        """The log-probabilities of the choice's tokens come since its last chunk: all that arrived, also those whose
        text a stream still holds back (it could start a stop string); `last`: the end's, which may add the end
        token."""
        if not self.logprobs:
            return None
        told = self._told.setdefault(index, _Told(TokenTexts(self.tokenizer, as_ids=self.as_ids)))
        start, told.tokens = told.tokens, progress.completion_tokens
        return {"content": chat_logprobs(told.texts, progress.tokens[start: told.tokens], progress.logprobs[start: told.tokens]),
                "refusal": None}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text, finish_reason: str | None, whole: bool = False, index: int = 0, logprobs: dict | None = None,
                stop_reason: int | str | None = None) -> dict:
        """`text`: the message's content when whole, else the chunk's delta."""
        if whole:
            return {"index": index, "message": {"role": self.role, "content": text}, "finish_reason": finish_reason,
                    "logprobs": logprobs, "stop_reason": stop_reason}
        return {"index": index, "delta": text, "finish_reason": finish_reason, "logprobs": logprobs, "stop_reason": stop_reason}

    def _chunk(self, delta, finish_reason: str | None = None, index: int = 0, logprobs: dict | None = None,
               progress: Progress | None = None, opening: bool = False) -> dict:
        stop_reason = progress.stop_reason if finish_reason is not None and progress is not None else None
        chunk = {**self._head(self.chunk_kind),
                 "choices": [self._choice(delta, finish_reason, index=index, logprobs=logprobs, stop_reason=stop_reason)]}
        if progress is not None:
            self._with_ids(chunk, chunk["choices"][0], index, progress, last=finish_reason is not None, opening=opening)
        if self.with_usage:
            chunk["usage"] = usage(progress) if self.continuous and progress is not None else None
        return chunk


class TextCompletion(ChatCompletion):
    """The same for /v1/completions: choices carry `text`, chunks are text_completion objects too, and a stream
    opens with its first text (there is no role), or with `echo` the prompt's. `prompts[i]` is answer i's Prompt,
    set when it begins: the echoed text, and the tokens the log-probabilities of an echo are of. Offsets are into
    the choice's text (the echoed prompt's included)."""
    prefix, kind, chunk_kind = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str, with_usage: bool = False, tokenizer=None, logprobs: bool = False, as_ids: bool = False,
                 choices: int = 1, continuous: bool = False, echo: bool = False, answers: int = 1, token_ids: bool = False,
                 prompt_logprobs: int | None = None):
        super().__init__(model, with_usage, tokenizer, logprobs, as_ids, choices, continuous, token_ids=token_ids,
                         prompt_logprobs=prompt_logprobs)
        self.echo, self.prompts = echo, [None] * answers

    def echoed(self, index: int) -> str:
        """Answer i's prompt as its text begins with it: as sent, or token ids decoded."""
        prompt = self.prompts[index]
        return prompt.text or self.tokenizer.decode(prompt.ids[0].tolist(), skip_special_tokens=True)

    def opening(self, progress: Progress, index: int = 0) -> dict | None:
        if not self.echo:
            return None
        text, logprobs = self.echoed(index), None
        if self.logprobs:
            told = self._told[index] = _Told(TokenTexts(self.tokenizer, as_ids=self.as_ids), len(text))
            logprobs, _ = completion_logprobs(told.texts, self.prompts[index].ids[0].tolist(), progress.prompt_logprobs, 0)
        return self._chunk(text, index=index, logprobs=logprobs, progress=progress, opening=True)

    def delta(self, text: str, progress: Progress, index: int = 0) -> dict:
        return self._chunk(text, index=index, logprobs=self._stream_logprobs(progress, index), progress=progress)

    def ending(self, progress: Progress, index: int = 0) -> dict:
        return self._chunk("", progress.finish_reason, index, logprobs=self._stream_logprobs(progress, index, last=True),
                           progress=progress)

    def _text(self, index: int, progress: Progress) -> str:
        return self.echoed(index) + progress.text if self.echo else progress.text

    facts_per_choice = True  # a completion's choices may each have a prompt of its own (vLLM's layout)

    def _prompt_of(self, index: int, progress: Progress) -> list[int]:
        return self.prompts[index].ids[0].tolist()

    def _whole_logprobs(self, index: int, progress: Progress) -> dict:
        ids, count = self.prompts[index].ids[0].tolist(), progress.completion_tokens
        texts = TokenTexts(self.tokenizer, () if self.echo else ids, self.as_ids)
        parts, offset = [], 0
        if self.echo:
            prompt, _ = completion_logprobs(texts, ids, progress.prompt_logprobs, 0)
            parts.append(prompt)
            offset = len(self.echoed(index))
        answer, offset = completion_logprobs(texts, progress.tokens[:count], progress.logprobs[:count], offset)
        return joined(*parts, answer, *self._end(texts, progress, offset))

    @staticmethod
    def _end(texts: TokenTexts, progress: Progress, offset: int) -> list[dict]:
        """The end token that finished the answer, as vLLM lists it (lm-eval drops a response's last entry)."""
        if progress.ended_by is None:
            return []
        return [completion_logprobs(texts, [progress.ended_by.token], [progress.ended_by], offset)[0]]

    def _stream_logprobs(self, progress: Progress, index: int, last: bool = False) -> dict | None:
        if not self.logprobs:
            return None
        told = self._told.setdefault(index, _Told(TokenTexts(self.tokenizer, self.prompts[index].ids[0].tolist(), self.as_ids)))
        start, told.tokens = told.tokens, progress.completion_tokens
        layout, told.offset = completion_logprobs(told.texts, progress.tokens[start: told.tokens],
                                                  progress.logprobs[start: told.tokens], told.offset)
        return joined(layout, *self._end(told.texts, progress, told.offset)) if last else layout

    def _choice(self, text, finish_reason: str | None, whole: bool = False, index: int = 0, logprobs: dict | None = None,
                stop_reason: int | str | None = None) -> dict:
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs, "stop_reason": stop_reason}
