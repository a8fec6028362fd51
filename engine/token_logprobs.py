"""Token log-probabilities as OpenAI's two APIs lay them out: a text completion's `logprobs` (parallel lists of
tokens, their log-probabilities, the most likely alternatives and each token's offset in the text, as lm-eval reads
them for its loglikelihood tasks) and a chat completion's (`content`: one object per token).

The numbers come from the scheduler (decoding.TokenLogprob); here they get their tokens' text. A token's text is
what it adds to the text before it (decoded after the tokens before it, as the answer's own text is, so that a
SentencePiece tokenizer's space before a word is the word's token's and the texts of a completion's tokens join
into its text); an alternative's is what it would have added in that token's place. A special token (an end or
start token, whose text the answer leaves out) shows its name and takes no place in the text."""

import re

from .answer_text import continuation
from .decoding import TokenLogprob

FLOOR = -9999.0  # for a log-probability of -inf (a token the model rules out): JSON has no infinities; vLLM's value
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token (Llama's, Mistral's): one byte of UTF-8


class TokenTexts:
    """The texts of a stream of tokens, each after those before it (`before`: the prompt's for a completion, none
    for a chat answer, which is decoded alone). `as_ids` names each token `token_id:N` instead (vLLM's
    return_tokens_as_token_ids: exact where two tokens have one text, or a token is a fraction of a character)."""

    def __init__(self, tokenizer, before: list[int] = (), as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.history = continuation(list(before))
        self.special = set(tokenizer.all_special_ids)

    def after(self, tokens: list[int], choices: list[list[int]]) -> list[list[str]]:
        """Per token, the texts of `choices[i]` (ids that could stand in its place: itself and its alternatives)
        after the tokens before it; then the tokens join what comes before the next ones."""
        contexts, asked = [], []
        for token, ids in zip(tokens, choices):
            contexts.append(self.history)
            asked.append(ids)
            self.history = continuation(self.history + [token])
        if self.as_ids:
            return [[f"token_id:{token}" for token in ids] for ids in asked]
        flat = [(context, token) for context, ids in zip(contexts, asked) for token in ids if token not in self.special]
        decode = self.tokenizer.batch_decode
        heads = decode([context for context, _ in flat], skip_special_tokens=True)
        wholes = decode([context + [token] for context, token in flat], skip_special_tokens=True)
        # where the context's text is no prefix of the whole (half a character completed by the token): its text alone
        alone = decode([[token] for _, token in flat], skip_special_tokens=True)
        found = iter([whole[len(head):] if whole.startswith(head) else single for head, whole, single in zip(heads, wholes, alone)])
        return [[self.tokenizer.convert_ids_to_tokens(token) if token in self.special else next(found) for token in ids]
                for ids in asked]

    def is_special(self, token: int) -> bool:
        return token in self.special

    def bytes_of(self, token: int, text: str) -> list[int]:
        """The UTF-8 bytes a token stands for: a byte-fallback token's one byte, else its text's."""
        if not self.as_ids and (byte := _BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(token) or "")):
            return [int(byte.group(1), 16)]
        return list(text.encode("utf-8"))


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(value, FLOOR)


def completion_logprobs(texts: TokenTexts, tokens: list[int], logprobs: list[TokenLogprob | None], offset: int) -> tuple[dict, int]:
    """A text completion's `logprobs` for `tokens` (None in `logprobs`: a prompt's first token, which has none), the
    first at `offset` in the choice's text; and the offset after them. Each token's `top_logprobs` holds its most
    likely alternatives and itself, as vLLM's do (lm-eval compares a token's log-probability with their best)."""
    choices = [[] if scored is None else list(dict.fromkeys([token, *(alternative for alternative, _ in scored.top)]))
               for token, scored in zip(tokens, logprobs)]
    named = texts.after(tokens, [[token, *ids] for token, ids in zip(tokens, choices)])
    layout = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, scored, ids, names in zip(tokens, logprobs, choices, named):
        layout["tokens"].append(names[0])
        layout["text_offset"].append(offset)
        offset += 0 if texts.is_special(token) else len(names[0])
        if scored is None:
            layout["token_logprobs"].append(None)
            layout["top_logprobs"].append(None)
            continue
        value = {alternative: logprob for alternative, logprob in scored.top}
        value[token] = scored.logprob
        layout["token_logprobs"].append(_logprob(scored.logprob))
        top = {}
        for alternative, name in zip(ids, names[1:]):
            top.setdefault(name, _logprob(value[alternative]))  # two ids of one text: the likelier's
        layout["top_logprobs"].append(top)
    return layout, offset


def joined(*layouts: dict) -> dict:
    """Completion logprobs of consecutive runs of tokens as one (the echoed prompt's, the answer's, its end token's)."""
    return {key: [item for layout in layouts for item in layout[key]] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(texts: TokenTexts, tokens: list[int], logprobs: list[TokenLogprob]) -> list[dict]:
    """A chat completion's `logprobs.content` entries for `tokens`: each token's text, log-probability and UTF-8
    bytes, and its `top_logprobs` (exactly the most likely ones asked for, as OpenAI's)."""
    named = texts.after(tokens, [[token, *(alternative for alternative, _ in scored.top)] for token, scored in zip(tokens, logprobs)])
    entries = []
    for token, scored, names in zip(tokens, logprobs, named):
        top = [{"token": name, "logprob": _logprob(logprob), "bytes": texts.bytes_of(alternative, name)}
               for (alternative, logprob), name in zip(scored.top, names[1:])]
        entries.append({"token": names[0], "logprob": _logprob(scored.logprob), "bytes": texts.bytes_of(token, names[0]),
                        "top_logprobs": top})
    return entries
