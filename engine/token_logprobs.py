"""Token log-probabilities as OpenAI's two APIs lay them out: a text completion's `logprobs` (parallel lists of
tokens, their log-probabilities, the most likely alternatives and each token's offset in the text, as lm-eval reads
them for its loglikelihood tasks) and a chat completion's (`content`: one object per token, with its bytes).

The numbers come from the scheduler (decoding.TokenLogprob); here they get their tokens' bytes and text. A token's
bytes are exact where the tokenizer says them: a byte-level BPE's (GPT-2's, Llama 3's, Qwen's) through its
byte-to-character table, a byte-fallback token (`<0x..>`, Llama 2's, Mistral's) its one byte; another token's are
the UTF-8 of what it adds to the text decoded before it (so a SentencePiece tokenizer's space before a word is that
word's token's). A token's text is what its bytes complete after those before it: a token holding part of a
character has none, the one that completes it has the character, so a completion's tokens join into its text and
its offsets never go back. An alternative's bytes and text are what it would have had in the token's place. A
special token (an end or start token, whose text the answer leaves out) shows its name, has no bytes and takes no
place in the text."""

import codecs
import json
import re
from typing import NamedTuple

from .decoding import TokenLogprob

FLOOR = -9999.0  # for a log-probability of -inf (a token the model rules out): JSON has no infinities; vLLM's value
CONTEXT = 6  # tokens a token's text is decoded after (enough for a first token's space and a split character)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token: one byte of UTF-8


def _byte_level_table() -> dict[str, int]:
    """The character a byte-level BPE writes for each byte, reversed: bytes that are printable characters stand for
    themselves, and the others (controls, space, some Latin-1) for 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {chr(byte if byte in printable else next(shifted)): byte for byte in range(256)}


class Piece(NamedTuple):
    """A token as the APIs show it: its `name` (its text; a special token's name; `token_id:N` when asked), the
    `text` it adds and its `bytes`."""
    name: str
    text: str
    bytes: list[int]


class TokenTexts:
    """The pieces of a stream of tokens, each after those before it (`before`: the prompt's for a completion, none
    for a chat answer, which is decoded alone). `as_ids` names each token `token_id:N` (vLLM's
    return_tokens_as_token_ids: exact where two tokens have one text); the texts, and so the offsets, stay."""

    def __init__(self, tokenizer, before: list[int] = (), as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.special = set(tokenizer.all_special_ids)
        self.added = {index for index in getattr(tokenizer, "added_tokens_decoder", {})}  # their text is plain
        self.byte_level = _byte_level(tokenizer)
        self.history: list[int] = []  # the last CONTEXT tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in list(before)[-CONTEXT:]:  # where a character split across the prompt's end stands
            self._advance(token, self._bytes([self.history], [[token]])[0][0])

    def after(self, tokens: list[int], candidates: list[list[int]]) -> list[list[Piece]]:
        """Per token, the pieces of `candidates[i]` (ids that could stand in its place: itself first, then its
        alternatives) after the tokens before it; then each token joins those before the next ones."""
        contexts, history = [], self.history
        for token in tokens:
            contexts.append(history)
            history = (history + [token])[-CONTEXT:]
        found = []
        for token, ids, raw in zip(tokens, candidates, self._bytes(contexts, candidates)):  # one batch of decodes
            state = self.utf8.getstate()
            pieces = []
            for candidate, data in zip(ids, raw):
                if candidate in self.special:
                    pieces.append(Piece(self._name(candidate, self.tokenizer.convert_ids_to_tokens(candidate)), "", []))
                    continue
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                decoder.setstate(state)
                text = decoder.decode(bytes(data))
                pieces.append(Piece(self._name(candidate, text), text, data))
            found.append(pieces)
            self._advance(token, raw[0])
        return found

    def _advance(self, token: int, data: list[int]):
        if token not in self.special:
            self.utf8.decode(bytes(data))
        self.history = (self.history + [token])[-CONTEXT:]

    def _name(self, token: int, text: str) -> str:
        return f"token_id:{token}" if self.as_ids else text

    def _bytes(self, contexts: list[list[int]], candidates: list[list[int]]) -> list[list[list[int]]]:
        """Per position (its context and its candidates), each candidate's bytes (none for a special token)."""
        names = self.tokenizer.convert_ids_to_tokens([token for ids in candidates for token in ids])
        names = iter(names)
        asked = []  # (position, candidate) whose bytes are their text in context
        result = []
        for position, ids in enumerate(candidates):
            row = []
            for index, token in enumerate(ids):
                name = next(names) or ""
                if token in self.special:
                    row.append([])
                elif self.byte_level and token not in self.added:
                    row.append([self.byte_level[char] for char in name] if all(char in self.byte_level for char in name)
                               else list(name.encode("utf-8")))
                elif byte := _BYTE_TOKEN.fullmatch(name):
                    row.append([int(byte.group(1), 16)])
                else:
                    row.append(None)
                    asked.append((position, index))
            result.append(row)
        if asked:
            decode = self.tokenizer.batch_decode
            heads = decode([contexts[position] for position in sorted({position for position, _ in asked})], skip_special_tokens=True)
            head_of = dict(zip(sorted({position for position, _ in asked}), heads))
            wholes = decode([contexts[position] + [candidates[position][index]] for position, index in asked], skip_special_tokens=True)
            for (position, index), whole in zip(asked, wholes):
                head = head_of[position]
                text = whole[len(head):] if whole.startswith(head) else self.tokenizer.decode([candidates[position][index]])
                result[position][index] = list(text.encode("utf-8"))
        return result


def _byte_level(tokenizer) -> dict[str, int] | None:
    """The byte table, if the tokenizer's decoder is a byte-level one (alone or in a sequence)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [part.get("type") for part in decoder.get("decoders") or []]
    return _byte_level_table() if "ByteLevel" in kinds else None


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(value, FLOOR)


def completion_logprobs(texts: TokenTexts, tokens: list[int], logprobs: list[TokenLogprob | None], offset: int) -> tuple[dict, int]:
    """A text completion's `logprobs` for `tokens` (None in `logprobs`: a prompt's first token, which has none), the
    first at `offset` in the choice's text; and the offset after them. Each token's `top_logprobs` holds its most
    likely alternatives and itself, as vLLM's do (lm-eval compares a token's log-probability with their best)."""
    candidates = [[token] if scored is None else list(dict.fromkeys([token, *(alternative for alternative, _ in scored.top)]))
                  for token, scored in zip(tokens, logprobs)]
    named = texts.after(tokens, candidates)
    layout = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, scored, ids, pieces in zip(tokens, logprobs, candidates, named):
        layout["tokens"].append(pieces[0].name)
        layout["text_offset"].append(offset)
        offset += len(pieces[0].text)
        if scored is None:
            layout["token_logprobs"].append(None)
            layout["top_logprobs"].append(None)
            continue
        value = {alternative: logprob for alternative, logprob in scored.top}
        value[token] = scored.logprob
        layout["token_logprobs"].append(_logprob(scored.logprob))
        top = {}
        for alternative, piece in zip(ids, pieces):
            top.setdefault(piece.name, _logprob(value[alternative]))  # two ids of one name: the first, the token or likelier
        layout["top_logprobs"].append(top)
    return layout, offset


def joined(*layouts: dict) -> dict:
    """Completion logprobs of consecutive runs of tokens as one (the echoed prompt's, the answer's, its end token's)."""
    return {key: [item for layout in layouts for item in layout[key]] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def prompt_logprobs_layout(texts: TokenTexts, ids: list[int], scored: list[TokenLogprob | None], count: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` for a prompt of `ids`: None for its first token, then per token a dict by token id
    (as a string) of {"logprob", "rank", "decoded_token"}, the token's own first, then its `count` most likely
    alternatives (ranks 1 .. count; the token once where it is among them)."""
    if not ids:
        return []
    candidates = [[token, *(alternative for alternative, _ in entry.top[:count])] for token, entry in zip(ids[1:], scored[1:])]
    texts.after(ids[:1], [ids[:1]])
    layout: list[dict | None] = [None]
    for token, entry, pieces in zip(ids[1:], scored[1:], texts.after(ids[1:], candidates)):
        found = {str(token): {"logprob": _logprob(entry.logprob), "rank": entry.rank, "decoded_token": pieces[0].name}}
        for rank, ((alternative, logprob), piece) in enumerate(zip(entry.top[:count], pieces[1:]), start=1):
            found.setdefault(str(alternative), {"logprob": _logprob(logprob), "rank": rank, "decoded_token": piece.name})
        layout.append(found)
    return layout


def chat_logprobs(texts: TokenTexts, tokens: list[int], logprobs: list[TokenLogprob]) -> list[dict]:
    """A chat completion's `logprobs.content` entries for `tokens`: each token's text, log-probability and bytes,
    and its `top_logprobs` (exactly the most likely ones asked for, as OpenAI's)."""
    named = texts.after(tokens, [[token, *(alternative for alternative, _ in scored.top)] for token, scored in zip(tokens, logprobs)])
    return [{"token": pieces[0].name, "logprob": _logprob(scored.logprob), "bytes": pieces[0].bytes,
             "top_logprobs": [{"token": piece.name, "logprob": _logprob(logprob), "bytes": piece.bytes}
                              for (_, logprob), piece in zip(scored.top, pieces[1:])]}
            for scored, pieces in zip(logprobs, named)]
