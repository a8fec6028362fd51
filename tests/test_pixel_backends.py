"""Both of transformers' image backends, so an imported checkpoint sees the pixels its own processor makes."""

import pytest
import torch
from PIL import Image
from transformers import LlavaImageProcessor, LlavaImageProcessorPil

from llava_plugin import LlavaPluginImageProcessor

ODD = Image.effect_noise((45, 31), 60).convert("RGB")


def reference(cls):
    square = {"height": 32, "width": 32}
    return cls(do_pad=True, size=square, crop_size=square, do_center_crop=False)(ODD, return_tensors="pt")["pixel_values"]


def test_each_backend_reproduces_its_transformers_processor_on_an_odd_sized_image(tmp_path):
    torchvision = LlavaPluginImageProcessor(image_size=32, pixel_backend="torchvision")
    pil = LlavaPluginImageProcessor(image_size=32)
    assert torch.equal(torchvision(ODD, return_tensors="pt")["pixel_values"], reference(LlavaImageProcessor))
    assert torch.equal(pil(ODD, return_tensors="pt")["pixel_values"], reference(LlavaImageProcessorPil))
    assert not torch.allclose(reference(LlavaImageProcessor), reference(LlavaImageProcessorPil), atol=1e-3)  # why it matters
    torchvision.save_pretrained(tmp_path)
    assert LlavaPluginImageProcessor.from_pretrained(tmp_path).pixel_backend == "torchvision"


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"pixel_backend must be one of \('pil', 'torchvision'\), got 'cv2'"):
        LlavaPluginImageProcessor(image_size=32, pixel_backend="cv2")
