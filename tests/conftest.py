import pytest
import torch

import llava_plugin  # noqa: F401  (registers the Auto classes)
from llava_plugin import LlavaPluginForConditionalGeneration
from tiny_components import save_clip, save_llm, save_open_clip, save_siglip


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Folders of tiny pretrained parts, each in the layout its real counterpart ships in."""
    root = tmp_path_factory.mktemp("parts")
    return {
        "llm": str(save_llm(root / "llm")),
        "clip": str(save_clip(root / "clip")),
        "siglip": str(save_siglip(root / "siglip")),
        "open_clip": "open_clip:local-dir:" + str(save_open_clip(root / "open_clip")),
    }


@pytest.fixture(scope="session")
def assembled(parts):
    """A CLIP + LLaMA model with a fresh 2-layer MLP projector, as LLaVA-1.5 starts stage 1."""
    torch.manual_seed(0)
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"], projector="mlp2x_gelu")
    return model.eval(), processor


@pytest.fixture(scope="session")
def saved_checkpoint(assembled, tmp_path_factory):
    model, processor = assembled
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

