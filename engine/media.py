"""An API client's image URL -> the image's bytes, going only where the operator allowed.

`data:` URLs always (their size is checked before decoding the base64); `file://` URLs only inside the folder the
operator named (resolved first, so neither `..` nor a symbolic link leaves it); http(s) URLs only when the operator
turned them on, with a size and a time limit, and only from public addresses unless the operator named private
networks (see url_fetch)."""

import base64
import binascii
import os
import re
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from .url_fetch import MediaError, Network, Resolver, fetch, system_resolve

DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp|gif|bmp);base64,", re.IGNORECASE)


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None  # file:// URLs only below this folder; None: refused
    allow_urls: bool = False  # http(s) URLs
    max_bytes: int = 20_000_000  # of one encoded image
    fetch_timeout: float = 10.0  # seconds for an http(s) image in all, redirects included
    private_networks: tuple[Network, ...] = ()  # fetched from besides public addresses (an operator's own hosts)
    max_images: int = 4  # per request
    resolve: Resolver = field(default=system_resolve, compare=False, repr=False)  # host, port -> addresses
    verify: ssl.SSLContext | bool = field(default=True, compare=False, repr=False)  # https certificates (httpx's)


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


_LENIENT = str.maketrans({"-": "+", "_": "/", **dict.fromkeys(" \t\r\n", None)})


def _data(url: str, policy: MediaPolicy) -> bytes:
    header = DATA_URL.match(url)
    if header is None:
        raise MediaError("a data URL must start data:image/<png|jpeg|webp|gif|bmp>;base64,")
    encoded = url[header.end():]
    if len(encoded) * 3 // 4 > policy.max_bytes:  # measured before a byte is decoded
        raise _too_large(len(encoded) * 3 // 4, policy)
    # as the encoders clients use write it: lines wrapped at 76 (MIME, the `base64` tool), the URL-safe alphabet,
    # the padding left off; anything else outside the alphabet is refused
    encoded = encoded.translate(_LENIENT).rstrip("=")
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as error:
        raise MediaError(f"the image's base64 is malformed: {error}") from error


def _local(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError("local image files are off on this server (its operator can allow a folder)")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):  # file://host/path is another machine's file (a share, on Windows)
        raise MediaError(f"{url} names the host {parsed.netloc}: file:// URLs are this server's own files only")
    # one answer for a missing path and for one outside the folder: else a client learns which paths exist anywhere
    refused = MediaError(f"{url} is not an image file inside the folder this server allows")
    try:
        path = Path(unquote(parsed.path)).resolve(strict=True)  # follows every link and `..` first
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte (%00)
        raise refused from None
    if not path.is_relative_to(policy.allowed_local_path.resolve()):
        raise refused
    return _regular_file(path, policy, refused)


def _regular_file(path: Path, policy: MediaPolicy, refused: MediaError) -> bytes:
    """The bytes of the regular file at `path`, opened once and judged by what was opened: a link swapped in since
    the check is not followed, a fifo does not block the open, and a file that grew is still read to the limit."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise refused from None
    try:
        found = os.fstat(descriptor)
        if not stat.S_ISREG(found.st_mode):  # a device (/dev/zero), a fifo, a folder
            raise refused
        if found.st_size > policy.max_bytes:
            raise _too_large(found.st_size, policy)
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(policy.max_bytes + 1)
    finally:
        os.close(descriptor)
    if len(data) > policy.max_bytes:
        raise _too_large(len(data), policy)
    return data


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_urls:
        raise MediaError("image URLs are off on this server: send the image as a data:image/...;base64 URL")
    return fetch(url, policy.max_bytes, policy.fetch_timeout, policy.private_networks, policy.resolve, policy.verify)
