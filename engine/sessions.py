"""Per-user chat state: the KV cache of what was already computed, the image's vision features, and the
conversation, kept in a bounded least-recently-used store so memory stays flat under many users."""

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class Session:
    image_key: str | None = None
    vision_features: torch.Tensor | None = None  # (1, S, C) the tower's output for this session's image
    cache: object | None = None  # transformers Cache holding the keys/values of `tokens`
    tokens: torch.Tensor | None = None  # (T,) ids whose keys/values are in `cache`
    lock: threading.Lock = field(default_factory=threading.Lock)
    salt: str | None = None  # a one-off answer's cache salt (see prefix_cache): what it stores is found by that salt only

    def forget_image(self):
        self.image_key = self.vision_features = self.cache = self.tokens = None

    def drop_cache(self):
        self.cache = self.tokens = None

    @property
    def cached_tokens(self) -> int:
        return 0 if self.tokens is None else len(self.tokens)


class SessionStore:
    """At most `max_sessions` sessions and `max_cached_tokens` cached tokens in all; the least recently used
    session loses its cache first (its conversation stays, so it recomputes instead of failing)."""

    def __init__(self, max_sessions: int = 64, max_cached_tokens: int = 65_536):
        self.max_sessions, self.max_cached_tokens = max_sessions, max_cached_tokens
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.pop(session_id, None) or Session()
            self._sessions[session_id] = session  # re-inserted last: the OrderedDict's order is the recency
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return session

    def trim(self, keep: Session | None = None):
        """Drops least recently used caches until the total fits."""
        with self._lock:
            total = sum(session.cached_tokens for session in self._sessions.values())
            for session in list(self._sessions.values()):
                if total <= self.max_cached_tokens:
                    break
                if session is keep or session.cache is None or not session.lock.acquire(blocking=False):
                    continue  # a session that is answering keeps its cache: its decoding loop is using it
                try:
                    total -= session.cached_tokens
                    session.drop_cache()
                finally:
                    session.lock.release()

    def reset(self, session_id: str):
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def cached_tokens(self) -> int:
        return sum(session.cached_tokens for session in self._sessions.values())
