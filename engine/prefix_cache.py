"""Keys and values of finished requests, found again by prefix: what lets stateless API clients, which send the whole
conversation every time, prefill only their new tokens (vLLM calls it automatic prefix caching).

A request reuses the entry sharing the longest prefix of token ids with it. Image tokens all have one id, so the
image is part of the key: past the first image token, only an entry of the same image (by pixel hash) counts; before
it (the system prompt), any entry does. The tower's output is kept per image too, so a follow-up about the same image
never runs the tower again. Both stores are bounded and forget the least recently used first.

Finding the entry must not cost more as the cache fills (a full cache holds hundreds of answers, and comparing a
request with each took milliseconds under the lock, per request). Every entry is indexed by the chained hash of
each of its prefixes (a prefix's hash covers its tokens and, from the first image token on, the image's key), as
vLLM indexes blocks: a request follows its own prefixes' hashes until one is missing, so the work grows with the
length it shares, not with the number of entries.

A request's cache salt (vLLM's `cache_salt`) begins its chain of hashes and names its images' features, so it
shares nothing, not even the system prompt, with requests of another salt or none: a tenant cannot learn from
another's timing what that one sent.
"""

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .kv_cache import cache_over
from .sessions import Session


@dataclass(eq=False)  # entries are compared by identity (their tensors have no truth value)
class _Entry:
    image_key: str | None
    tokens: torch.Tensor  # (T,) ids whose keys and values are in `layers`
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, T, head_dim) keys and values
    prefixes: list[int]  # prefixes[i]: the hash of tokens[: i + 1]


def common_prefix(cached: torch.Tensor | None, ids: torch.Tensor) -> int:
    if cached is None:
        return 0
    length = min(len(cached), len(ids))
    differ = (cached[:length] != ids[:length]).nonzero()
    return int(differ[0]) if len(differ) else length


def prefix_hashes(ids: torch.Tensor, image_key: str | None, image_token_id: int, salt: str | None = None) -> Iterator[int]:
    """The chained hash of each prefix of `ids`, shortest first: two sequences share the i-th when (collisions
    aside) their salts and first i + 1 tokens are equal and, if those reach an image token, so is their image."""
    chained, seen_image = 0 if salt is None else hash(("salt", salt)), False
    for token in ids.tolist():
        seen_image = seen_image or token == image_token_id
        chained = hash((chained, token, image_key if seen_image else None))
        yield chained


def _features_key(image_key: str | None, salt: str | None):
    return image_key if salt is None else (salt, image_key)


class PrefixCache:
    """At most `max_tokens` cached tokens in all and the vision features of `max_images` images."""

    def __init__(self, config, image_token_id: int, max_tokens: int = 65_536, max_images: int = 64):
        self.config, self.image_token_id = config, image_token_id
        self.max_tokens, self.max_images = max_tokens, max_images
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id(entry), least recently used first
        self._by_prefix: dict[int, dict[int, _Entry]] = {}  # prefix hash -> the entries holding that prefix, by id
        self._by_end: dict[int, dict[int, _Entry]] = {}  # the hash of an entry's whole length -> the entries, by id
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._tokens = 0  # cached in all
        self._lock = threading.Lock()

    def session(self, image_key: str, ids: torch.Tensor, salt: str | None = None) -> Session:
        """A one-off Session for a request of `ids` (T,) about `image_key`: holding a cache of the longest reusable
        prefix (sharing the entry's tensors: DynamicCache only ever replaces them, never writes into them) and the
        image's features when known; of entries stored with the same `salt` only."""
        session = Session(image_key=image_key, salt=salt)
        images = (ids == self.image_token_id).nonzero()
        first_image = int(images[0]) if len(images) else len(ids)
        features = _features_key(image_key, salt)
        with self._lock:
            session.vision_features = self._features.get(features)
            if session.vision_features is not None:
                self._features.move_to_end(features)
            holders = None
            for chained in prefix_hashes(ids, image_key, self.image_token_id, salt):
                if chained not in self._by_prefix:
                    break
                holders = self._by_prefix[chained]
            if holders is None:
                return session
            best = next(reversed(holders.values()))  # any: they all share that prefix with the request
            self._entries.move_to_end(id(best))
        keep = common_prefix(best.tokens, ids)  # the same length, unless two hashes collided
        if best.image_key != image_key:
            keep = min(keep, first_image)
        if keep == 0:
            return session
        session.cache = cache_over(self.config, [
            (keys[:, :, :keep], values[:, :, :keep]) for keys, values in best.layers])
        session.tokens = best.tokens[:keep]
        return session

    def has_features(self, image_key: str, salt: str | None = None) -> bool:
        with self._lock:
            return _features_key(image_key, salt) in self._features

    def store(self, session: Session):
        """Keeps what `session` (a finished one-off answer over a DynamicCache) computed."""
        length = session.cached_tokens
        if not isinstance(session.cache, DynamicCache) or not 0 < length <= self.max_tokens:
            return
        entry = _Entry(session.image_key, session.tokens,
                       [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in session.cache.layers],
                       list(prefix_hashes(session.tokens, session.image_key, self.image_token_id, session.salt)))
        features = _features_key(session.image_key, session.salt)
        with self._lock:
            if session.vision_features is not None:
                self._features[features] = session.vision_features
                self._features.move_to_end(features)
                while len(self._features) > self.max_images:
                    self._features.popitem(last=False)
            # an entry the new one extends is of no more use: every request it serves, the new one serves as well
            for old in [old for chained in entry.prefixes for old in self._by_end.get(chained, {}).values()]:
                if old.image_key == entry.image_key:
                    self._forget(old)
            self._entries[id(entry)] = entry
            self._by_end.setdefault(entry.prefixes[-1], {})[id(entry)] = entry
            for chained in entry.prefixes:
                self._by_prefix.setdefault(chained, {})[id(entry)] = entry
            self._tokens += length
            while self._tokens > self.max_tokens:
                self._forget(next(iter(self._entries.values())))

    def _forget(self, entry: _Entry):
        del self._entries[id(entry)]
        ends = self._by_end[entry.prefixes[-1]]
        del ends[id(entry)]
        if not ends:
            del self._by_end[entry.prefixes[-1]]
        self._tokens -= len(entry.tokens)
        for chained in entry.prefixes:
            holders = self._by_prefix.get(chained)
            if holders is not None:
                holders.pop(id(entry), None)
                if not holders:
                    del self._by_prefix[chained]

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def __len__(self) -> int:
        return len(self._entries)
