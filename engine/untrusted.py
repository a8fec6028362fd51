"""What a visitor sends (a web page, an API client) is hostile until measured: an image's size is read from its
header before a pixel is decoded, a text's length is capped before it is tokenized, and a special token typed as
text stays text.

Why the header: a 20 KB PNG can declare 13000x13000 pixels, which decode to half a gigabyte (PIL only refuses at
twice its 89-megapixel warning). Why before tokenizing: a 50 MB question takes minutes and gigabytes to tokenize,
while every other visitor waits."""

import io
import os
import threading
import warnings
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from llava_plugin.image_processing_llava_plugin import to_rgb

# Formats a browser uploads. Others are refused: PIL's EPS reader runs Ghostscript, and exotic decoders are attack
# surface no visitor needs.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_PIXELS = 40_000_000  # a 48-megapixel phone photo is refused, a 36 MP one (7360x4912) passes; decoding it takes ~110 MB
MAX_QUESTION_CHARS = 4_000
# A whole conversation as a client sends it (every turn, both roles): far more than any context of ours holds. Each
# message counts MESSAGE_OVERHEAD characters more: the chat template adds that much around it, so that 400,000 empty
# messages are refused here instead of templated and tokenized into 7 million tokens first.
MAX_CONVERSATION_CHARS = 64_000
MESSAGE_OVERHEAD = 16
# Full-size decodes at once: a 40-megapixel PNG takes about half a gigabyte on its way to RGB (RGBA, composited,
# converted); more visitors than this wait for their turn instead of adding another half gigabyte each.
DECODES_AT_ONCE = threading.BoundedSemaphore(2)
WORD_JOINER = "\u2060"  # invisible, and no tokenizer's special token contains it


class UntrustedInputError(ValueError):
    """A visitor's input was refused; the message says what and which limit, and is safe to show them."""


def open_image(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int = MAX_PIXELS, max_side: int | None = None,
               name: str | None = None) -> Image.Image:
    """A fully decoded RGB image from a path, bytes or a binary file, refused before decoding when its header
    declares more than `max_pixels`. With `max_side`, the result is at most that many pixels a side, and a JPEG is
    decoded reduced (its DCT scaling) instead of decoded whole and then shrunk."""
    name = name or (os.path.basename(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "(uploaded)")
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():  # PIL warns of a bomb at 89 MP; we refuse below that, with our own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=ALLOWED_FORMATS)  # reads the header only
        with image:
            refuse_if_too_large(image.size, max_pixels, name)
            if max_side and image.format == "JPEG":
                image.draft("RGB", (max_side, max_side))
            with DECODES_AT_ONCE:
                image.load()
                rgb = to_rgb(image)
                if rgb is image:
                    rgb = image.copy()  # outlives the `with`, which closes the file
                if max_side and max(rgb.size) > max_side:
                    rgb.thumbnail((max_side, max_side))
    except UntrustedInputError:
        raise
    except Image.DecompressionBombError as error:  # PIL refuses at open past twice its own limit: ours is lower
        raise UntrustedInputError(f"the image {name} declares far more pixels than the limit of {max_pixels / 1e6:g} "
                                  f"megapixels ({error})") from error
    except UnidentifiedImageError as error:
        raise UntrustedInputError(f"cannot read image {name}: not an image in one of {', '.join(ALLOWED_FORMATS)}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UntrustedInputError(f"cannot read image {name}: {error}") from error
    return rgb


def image_size(source: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, refused as open_image refuses it."""
    name = os.path.basename(os.fspath(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=ALLOWED_FORMATS) as image:
                width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UntrustedInputError(f"cannot read image {name}: {error}") from error
    refuse_if_too_large((width, height), max_pixels, name)
    return width, height


def refuse_if_too_large(size: tuple[int, int], max_pixels: int, name: str):
    width, height = size
    if width * height > max_pixels:
        raise UntrustedInputError(f"the image {name} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
                                  f"the limit is {max_pixels / 1e6:g} megapixels")


def conversation_size(messages: list[dict]) -> int:
    """Characters a conversation will be templated from: its texts, and MESSAGE_OVERHEAD per message."""
    return sum(MESSAGE_OVERHEAD + len(message["content"] if isinstance(message["content"], str)
                                      else "".join(part.get("text", "") for part in message["content"]))
               for message in messages)


def check_text(text: str, limit: int = MAX_QUESTION_CHARS, what: str = "the question") -> str:
    if len(text) > limit:
        raise UntrustedInputError(f"{what} is {len(text):,} characters long; the limit is {limit:,}")
    return text


def as_plain_text(text: str, special_tokens: list[str]) -> str:
    """`text` with every special token string in it broken by an invisible word joiner, so that a visitor who types
    `<image>` or `</s>` writes those characters, never an image marker or an end of turn."""
    for token in sorted((token for token in special_tokens if len(token) > 1), key=len, reverse=True):
        text = text.replace(token, token[0] + WORD_JOINER + token[1:])
    return text


def plain_messages(messages: list[dict], special_tokens: list[str]) -> list[dict]:
    """Chat-template messages with every text part made plain text (see `as_plain_text`); image parts untouched."""
    def plain(content):
        if isinstance(content, str):
            return as_plain_text(content, special_tokens)
        return [{**part, "text": as_plain_text(part["text"], special_tokens)} if part.get("type") == "text" else part
                for part in content]

    return [{**message, "content": plain(message["content"])} for message in messages]
