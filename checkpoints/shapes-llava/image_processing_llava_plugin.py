"""Image preprocessing: any image a user has -> RGB -> square (pad, resize or crop) -> normalized pixel_values.

Built on transformers' PIL LLaVA image processor, so "pad" matches llava-hf with `do_pad` and the original LLaVA-1.5
(expand to square with the mean colour, then resize). This file ships as remote code.
"""

import os

import numpy as np
from PIL import Image
from transformers import LlavaImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .configuration_llava_plugin import IMAGE_ASPECTS

# Modes PIL would clip instead of scale when converting to RGB: 16-bit and 32-bit greyscale, and float.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageLoadError(ValueError):
    """An image could not be read; the message names the file."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "filename", "") or f"<in-memory {type(source).__name__}>"


def _narrow_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and array.max(initial=0) <= 1.0:
        peak = 1.0
    elif image.mode.startswith("I;16") or array.max(initial=0) > 255:
        peak = 65535.0
    else:
        peak = 255.0
    return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every PIL mode: transparency composited on white, 16-bit scaled (not clipped), CMYK and palettes converted."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        image = _narrow_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """A path, PIL image or HWC/HW uint8 array -> a fully decoded RGB PIL image; ImageLoadError names what failed."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with Image.open(source) as opened:
                opened.load()
                return to_rgb(opened)
        if isinstance(source, Image.Image):
            source.load()  # a lazily opened, truncated file fails here rather than deep inside resize
            return to_rgb(source)
        if isinstance(source, np.ndarray) and source.dtype == np.uint8 and (source.ndim == 2 or source.shape[-1] in (1, 2, 4)):
            return to_rgb(Image.fromarray(source.squeeze(-1) if source.ndim == 3 and source.shape[-1] == 1 else source))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"cannot read image {_describe(source)}: {error}") from error
    return source  # other arrays and tensors: transformers validates them


class LlavaPluginImageProcessor(LlavaImageProcessorPil):
    """`image_aspect` chooses how a non-square image becomes `image_size` x `image_size`:
    "pad" pads to square with the mean colour (LLaVA-1.5), "resize" stretches, "crop" keeps the centre (CLIP)."""

    def __init__(self, image_aspect: str = "pad", image_size: int = 336, image_mean=None, image_std=None, **kwargs):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        square = {"height": image_size, "width": image_size}
        kwargs.update(
            size={"shortest_edge": image_size} if image_aspect == "crop" else square,
            crop_size=square,
            do_center_crop=image_aspect == "crop",
            do_pad=image_aspect == "pad",
            image_mean=list(image_mean or OPENAI_CLIP_MEAN),
            image_std=list(image_std or OPENAI_CLIP_STD),
        )
        super().__init__(**kwargs)
        self.image_aspect = image_aspect
        self.image_size = image_size

    def fetch_images(self, images):
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        return load_image(images)

    def preprocess(self, images, *args, **kwargs):
        return super().preprocess(self.fetch_images(images), *args, **kwargs)


LlavaPluginImageProcessor.register_for_auto_class()

__all__ = ["LlavaPluginImageProcessor", "ImageLoadError", "load_image", "to_rgb"]
