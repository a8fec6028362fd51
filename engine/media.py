"""An API client's image URL -> the image's bytes, going only where the operator allowed.

`data:` URLs always (their size is checked before decoding the base64); `file://` URLs only inside the folder the
operator named (resolved first, so neither `..` nor a symbolic link leaves it); http(s) URLs only when the operator
turned them on, with a size and a time limit (the server then fetches what a client points it at: an operator who
allows this on a network with private services should know it)."""

import base64
import binascii
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp|gif|bmp);base64,", re.IGNORECASE)


class MediaError(ValueError):
    """An image URL that is refused; `status` is the HTTP status to answer with (400, or 413 when too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None  # file:// URLs only below this folder; None: refused
    allow_urls: bool = False  # http(s) URLs
    max_bytes: int = 20_000_000  # of one encoded image
    fetch_timeout: float = 10.0  # seconds for an http(s) image in all


def image_bytes(url: str, policy: MediaPolicy) -> bytes:
    if url.startswith("data:"):
        return _data(url, policy)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return _local(url, policy)
    if scheme in ("http", "https"):
        return _remote(url, policy)
    raise MediaError("an image_url must be a data:image/...;base64 URL" + (", a file:// URL" if policy.allowed_local_path else "")
                     + (" or an http(s) URL" if policy.allow_urls else ""))


def _too_large(size: int, policy: MediaPolicy) -> MediaError:
    return MediaError(f"the image is {size:,} bytes; the limit is {policy.max_bytes:,}", status=413)


def _data(url: str, policy: MediaPolicy) -> bytes:
    header = DATA_URL.match(url)
    if header is None:
        raise MediaError("a data URL must start data:image/<png|jpeg|webp|gif|bmp>;base64,")
    encoded = url[header.end():]
    if len(encoded) * 3 // 4 > policy.max_bytes:  # measured before a byte is decoded
        raise _too_large(len(encoded) * 3 // 4, policy)
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as error:
        raise MediaError(f"the image's base64 is malformed: {error}") from error


def _local(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError("local image files are off on this server (its operator can allow a folder)")
    root = policy.allowed_local_path.resolve()
    try:
        path = Path(unquote(urlparse(url).path)).resolve(strict=True)  # follows every link and `..` first
    except (OSError, RuntimeError):
        raise MediaError(f"no such image file: {url}") from None
    if not path.is_relative_to(root) or not path.is_file():
        raise MediaError(f"{url} is not a file inside the folder this server allows")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise _too_large(size, policy)
    return path.read_bytes()


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_urls:
        raise MediaError("image URLs are off on this server: send the image as a data:image/...;base64 URL")
    try:
        with httpx.Client(timeout=policy.fetch_timeout, follow_redirects=True, max_redirects=3) as client, \
                client.stream("GET", url) as response:
            response.raise_for_status()
            declared = int(response.headers.get("content-length") or 0)
            if declared > policy.max_bytes:
                raise _too_large(declared, policy)
            data, deadline = bytearray(), time.monotonic() + policy.fetch_timeout
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > policy.max_bytes:
                    raise _too_large(len(data), policy)
                if time.monotonic() > deadline:  # httpx's timeout is per read: a slow drip would pass it
                    raise MediaError(f"fetching the image {url} took more than {policy.fetch_timeout:g} s")
            return bytes(data)
    except httpx.HTTPError as error:
        raise MediaError(f"could not fetch the image {url}: {type(error).__name__}") from error
