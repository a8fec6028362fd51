"""Images already decoded, found again by their encoded bytes: an API client sends a conversation's image again with
every follow-up, and decoding it and hashing its pixels (the prefix cache's key) cost more than the model's whole
step on small models. Bounded by the pixels held; the least recently used go first."""

import hashlib
import threading
from collections import OrderedDict

from PIL import Image


class DecodedImages:
    """At most `max_pixels` pixels of decoded images (a 2048x2048 RGB image is 4 Mpx, 12 MB)."""

    def __init__(self, max_pixels: int = 16_000_000):
        self.max_pixels = max_pixels
        self._images: OrderedDict[bytes, tuple[Image.Image, str]] = OrderedDict()
        self._pixels = 0
        self._lock = threading.Lock()

    def get(self, data: bytes, decode, fingerprint) -> tuple[Image.Image, str]:
        """(image, fingerprint) of the encoded image `data`: from the store, or `decode(data)` and `fingerprint(image)`
        now (outside the lock: two threads may decode one image at once, which is only wasted work). The image is
        shared: callers only read it."""
        key = hashlib.sha256(data).digest()
        with self._lock:
            found = self._images.get(key)
            if found is not None:
                self._images.move_to_end(key)
                return found
        image = decode(data)
        found = (image, fingerprint(image))
        pixels = image.width * image.height
        if pixels <= self.max_pixels:
            with self._lock:
                if key not in self._images:
                    self._images[key] = found
                    self._pixels += pixels
                while self._pixels > self.max_pixels:
                    _, (old, _) = self._images.popitem(last=False)
                    self._pixels -= old.width * old.height
        return found

    def __len__(self) -> int:
        return len(self._images)
