"""Image preprocessing: any image a user has -> RGB -> square (pad, resize or crop) -> normalized pixel_values.

Built on transformers' PIL LLaVA image processor, so "pad" matches llava-hf with `do_pad` and the original LLaVA-1.5
(expand to square with the mean colour, then resize). This file ships as remote code.
"""

import os

import numpy as np
from PIL import Image
from transformers import BatchFeature, LlavaImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .anyres import check_pinpoints
from .configuration_llava_plugin import IMAGE_ASPECTS

BACKENDS = ("pil", "torchvision")  # transformers' two image backends; their resizes differ by a few levels

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
    "pad" pads to square with the mean colour (LLaVA-1.5), "resize" stretches, "crop" keeps the centre (CLIP).

    `image_grid_pinpoints` (AnyRes, LLaVA-NeXT) replaces `image_aspect`: each image becomes its base tile and the
    tiles of its best-fit canvas, all images' tiles in one flat (tiles, 3, S, S) batch, with `image_sizes`.
    `pixel_backend` names transformers' resizing to reproduce: "pil" (ours by default) or "torchvision" (the default of
    transformers' own LLaVA processors, so an imported llava-hf checkpoint sees the pixels it was trained on)."""

    def __init__(self, image_aspect: str = "pad", image_size: int = 336, image_mean=None, image_std=None,
                 image_grid_pinpoints=None, pixel_backend: str = "pil", **kwargs):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if pixel_backend not in BACKENDS:
            raise ValueError(f"pixel_backend must be one of {BACKENDS}, got {pixel_backend!r}")
        square = {"height": image_size, "width": image_size}
        if image_grid_pinpoints is not None:
            _anyres_defaults(kwargs, image_size, image_mean, image_std)
        else:
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
        self.image_grid_pinpoints = check_pinpoints(image_grid_pinpoints, image_size) if image_grid_pinpoints is not None else None
        self.pixel_backend = pixel_backend

    def fetch_images(self, images):
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        return load_image(images)

    def preprocess(self, images, *args, **kwargs):
        images = self.fetch_images(images)
        if self.image_grid_pinpoints is None and self.pixel_backend == "pil":
            return super().preprocess(images, *args, **kwargs)
        return self._preprocess_with_transformers(images, kwargs.get("return_tensors"))

    def _preprocess_with_transformers(self, images, return_tensors):
        """transformers' own LLaVA(-NeXT) image processor of our backend, built from our settings, does the pixels."""
        import transformers

        anyres_images = self.image_grid_pinpoints is not None
        name = ("LlavaNextImageProcessor" if anyres_images else "LlavaImageProcessor") + ("Pil" if self.pixel_backend == "pil" else "")
        settings = {key: getattr(self, key) for key in (
            "size", "crop_size", "do_center_crop", "resample", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "do_convert_rgb")}
        if not anyres_images:
            return getattr(transformers, name)(do_pad=self.do_pad, **settings)(images, return_tensors=return_tensors)
        reference = getattr(transformers, name)(do_pad=False, image_grid_pinpoints=self.image_grid_pinpoints, **settings)
        out = reference(images, return_tensors=None)
        tiles = [np.asarray(image_tiles, dtype=np.float32) for image_tiles in out["pixel_values"]]  # (tiles_i, 3, S, S) each
        sizes = [[int(v) for v in size] for size in out["image_sizes"]]
        return BatchFeature({"pixel_values": np.concatenate(tiles), "image_sizes": np.asarray(sizes, dtype=np.int64)},
                            tensor_type=return_tensors)


def _anyres_defaults(kwargs: dict, image_size: int, image_mean, image_std):
    """llava-hf's LLaVA-NeXT settings: tiles and base image at the tower's size; a saved processor keeps its own."""
    kwargs.setdefault("size", {"shortest_edge": image_size})
    kwargs.setdefault("crop_size", {"height": image_size, "width": image_size})
    kwargs.setdefault("do_center_crop", True)
    kwargs["do_pad"] = False  # tile-count padding: our tiles go flat, so images never need padding to the same count
    kwargs["image_mean"] = list(image_mean or OPENAI_CLIP_MEAN)
    kwargs["image_std"] = list(image_std or OPENAI_CLIP_STD)


LlavaPluginImageProcessor.register_for_auto_class()

__all__ = ["LlavaPluginImageProcessor", "ImageLoadError", "load_image", "to_rgb"]
