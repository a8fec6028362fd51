"""Keys and values of finished requests, found again by prefix: what lets stateless API clients, which send the whole
conversation every time, prefill only their new tokens (vLLM calls it automatic prefix caching).

A request reuses the entry sharing the longest prefix of token ids with it. Image tokens all have one id, so the
image is part of the key: past the first image token, only an entry of the same image (by pixel hash) counts; before
it (the system prompt), any entry does. The tower's output is kept per image too, so a follow-up about the same image
never runs the tower again. Both stores are bounded and forget the least recently used first."""

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .sessions import Session


@dataclass(eq=False)  # entries are compared by identity (their tensors have no truth value)
class _Entry:
    image_key: str | None
    tokens: torch.Tensor  # (T,) ids whose keys and values are in `layers`
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, T, head_dim) keys and values


def common_prefix(cached: torch.Tensor | None, ids: torch.Tensor) -> int:
    if cached is None:
        return 0
    length = min(len(cached), len(ids))
    differ = (cached[:length] != ids[:length]).nonzero()
    return int(differ[0]) if len(differ) else length


class PrefixCache:
    """At most `max_tokens` cached tokens in all and the vision features of `max_images` images."""

    def __init__(self, config, image_token_id: int, max_tokens: int = 65_536, max_images: int = 64):
        self.config, self.image_token_id = config, image_token_id
        self.max_tokens, self.max_images = max_tokens, max_images
        self._entries: list[_Entry] = []  # least recently used first
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, image_key: str, ids: torch.Tensor) -> Session:
        """A one-off Session for a request of `ids` (T,) about `image_key`: holding a cache of the longest reusable
        prefix (sharing the entry's tensors: DynamicCache only ever replaces them, never writes into them) and the
        image's features when known."""
        session = Session(image_key=image_key)
        images = (ids == self.image_token_id).nonzero()
        first_image = int(images[0]) if len(images) else len(ids)
        with self._lock:
            session.vision_features = self._features.get(image_key)
            if session.vision_features is not None:
                self._features.move_to_end(image_key)
            best, keep = None, 0
            for entry in self._entries:
                shared = common_prefix(entry.tokens, ids)
                if entry.image_key != image_key:
                    shared = min(shared, first_image)
                if shared > keep:
                    best, keep = entry, shared
            if best is None:
                return session
            self._entries.remove(best)
            self._entries.append(best)
        session.cache = DynamicCache(config=self.config, ddp_cache_data=[
            (keys[:, :, :keep], values[:, :, :keep]) for keys, values in best.layers])
        session.tokens = best.tokens[:keep]
        return session

    def has_features(self, image_key: str) -> bool:
        with self._lock:
            return image_key in self._features

    def store(self, session: Session):
        """Keeps what `session` (a finished one-off answer over a DynamicCache) computed."""
        length = session.cached_tokens
        if not isinstance(session.cache, DynamicCache) or not 0 < length <= self.max_tokens:
            return
        entry = _Entry(session.image_key, session.tokens,
                       [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in session.cache.layers])
        with self._lock:
            if session.vision_features is not None:
                self._features[session.image_key] = session.vision_features
                self._features.move_to_end(session.image_key)
                while len(self._features) > self.max_images:
                    self._features.popitem(last=False)
            # an entry the new one extends is of no more use: every request it serves, the new one serves as well
            self._entries = [old for old in self._entries if not (
                old.image_key == entry.image_key and len(old.tokens) <= length and common_prefix(old.tokens, entry.tokens) == len(old.tokens))]
            self._entries.append(entry)
            total = self.cached_tokens
            while total > self.max_tokens:
                total -= len(self._entries.pop(0).tokens)

    @property
    def cached_tokens(self) -> int:
        return sum(len(entry.tokens) for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)
