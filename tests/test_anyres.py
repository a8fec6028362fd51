"""AnyRes (LLaVA-NeXT) in our model: the geometry against transformers' llava_next, the processor's token counts
and tiles, the model's packing, and the checks that refuse what cannot work."""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from llava_plugin import LlavaPluginConfig, LlavaPluginForConditionalGeneration, anyres

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # the tiny CLIP's 32px tiles


def native_token_count(height, width, pinpoints, tile, patch):
    """transformers' LlavaNextProcessor count for a CLIP tower, the CLS dropped ("default" strategy)."""
    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints), patch_size=patch, num_additional_image_tokens=1)
    fake._get_unpadded_features = lambda *args: LlavaNextProcessor._get_unpadded_features(fake, *args)
    return LlavaNextProcessor._get_number_of_features(fake, height, width, tile, tile) - 1


def test_the_geometry_matches_transformers_llava_next_for_thousands_of_sizes():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 2500), rng.randint(1, 2500)) for _ in range(1500)] + [(672, 672), (336, 1008), (1, 4000), (31, 45)]
    for height, width in sizes:
        assert anyres.best_resolution(height, width, LLAVA_NEXT_PINPOINTS) == tuple(select_best_resolution((height, width), LLAVA_NEXT_PINPOINTS))
        rows, cols = anyres.tile_grid(height, width, LLAVA_NEXT_PINPOINTS, 336)
        native = unpad_image(torch.zeros(1, rows * 24, cols * 24), (height, width)).shape[1:]
        assert anyres.unpadded_grid(height, width, rows * 24, cols * 24) == tuple(native), (height, width)
        assert anyres.image_token_count(height, width, LLAVA_NEXT_PINPOINTS, 336, 24) == native_token_count(height, width, LLAVA_NEXT_PINPOINTS, 336, 14)
    # 672x672 at 336/14: five tiles of 576 features (2,880) plus a newline for each of the 48 grid rows.
    assert anyres.image_token_count(672, 672, LLAVA_NEXT_PINPOINTS, 336, 24) == 5 * 576 + 48


def test_packing_keeps_the_base_tile_then_the_unpadded_grid_row_by_row_with_newlines():
    # A 32x64 canvas of two 32px tiles (base, left, right), 2x2 patches each: a 2-row x 4-column feature grid.
    features = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1)
    newline = torch.tensor([-1.0])
    packed = anyres.pack_image_features(features, 32, 64, newline, [[32, 64]], 32).flatten().tolist()
    # base 0..3; then each grid row runs across both tiles (left's 4, 5 then right's 8, 9) and ends with the newline
    assert packed == [0, 1, 2, 3, 4, 5, 8, 9, -1, 6, 7, 10, 11, -1]
    # A wide image shows in 1 of 4 rows of an (4, 8) grid: one padded row is cut above and one below (bands are
    # equal, so the odd row left over stays); in a (2, 4) grid a 1-row image leaves no whole band to cut.
    assert anyres.unpadded_grid(8, 64, 4, 8) == (2, 8)
    assert anyres.unpadded_grid(16, 64, 2, 4) == (2, 4)


@pytest.fixture(scope="module")
def anyres_model(parts):
    torch.manual_seed(0)
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"],
                                                                           image_grid_pinpoints=TINY_PINPOINTS)
    return model.eval(), processor


def picture(width, height, seed=0):
    torch.manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3) * 255).to(torch.uint8).numpy())


def test_each_image_becomes_as_many_tokens_as_its_size_gives(anyres_model, tmp_path):
    model, processor = anyres_model
    images = [picture(45, 31), picture(20, 70), picture(64, 64)]
    out = processor(images=images, text="USER: <image>\n<image> and <image> ASSISTANT:", return_tensors="pt")
    assert out["image_sizes"].tolist() == [[31, 45], [70, 20], [64, 64]]
    counts = [anyres.image_token_count(h, w, TINY_PINPOINTS, 32, 4) for h, w in out["image_sizes"].tolist()]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == sum(counts) and len(set(counts)) > 1
    assert out["pixel_values"].shape == (3 + 3 + 5, 3, 32, 32)  # wide: 1+2 tiles, tall: 1+2, square: 1+4
    with torch.no_grad():
        assert model(**out).logits.shape[1] == out["input_ids"].shape[1]
    # saved and loaded back, the processor makes the same tiles and the model has its newline
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)(images=images, text="USER: <image>\n<image> and <image> ASSISTANT:", return_tensors="pt")
    assert torch.equal(again["pixel_values"], out["pixel_values"]) and torch.equal(again["input_ids"], out["input_ids"])
    loaded = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.image_newline, model.image_newline)


def test_padded_llava_hf_pixels_and_flat_tiles_give_the_same_logits(anyres_model):
    model, processor = anyres_model
    out = processor(images=[picture(45, 31), picture(64, 64)], text="<image><image>", return_tensors="pt")
    flat = out["pixel_values"]
    padded = torch.zeros(2, 5, 3, 32, 32)
    padded[0, :3], padded[1] = flat[:3], flat[3:]
    with torch.no_grad():
        a = model(input_ids=out["input_ids"], pixel_values=flat, image_sizes=out["image_sizes"]).logits
        b = model(input_ids=out["input_ids"], pixel_values=padded, image_sizes=out["image_sizes"]).logits
    assert torch.equal(a, b)


def test_wrong_sizes_and_missing_sizes_are_refused_with_what_was_expected(anyres_model):
    model, processor = anyres_model
    out = processor(images=[picture(45, 31)], text="<image>", return_tensors="pt")
    with pytest.raises(ValueError, match="need image_sizes"):
        model(input_ids=out["input_ids"], pixel_values=out["pixel_values"])
    with pytest.raises(ValueError, match=r"3 tiles of features for images that need 5"):
        model(input_ids=out["input_ids"], pixel_values=out["pixel_values"], image_sizes=torch.tensor([[64, 64]]))


def test_the_config_refuses_pinpoints_that_do_not_tile_and_cls_features(anyres_model):
    config = anyres_model[0].config.to_dict()
    with pytest.raises(ValueError, match=r"\[32, 50\] is not a multiple of the tower's 32px tiles"):
        LlavaPluginConfig(**{**config, "image_grid_pinpoints": [[32, 64], [32, 50]]})
    with pytest.raises(ValueError, match="vision_feature_select must be 'patch'"):
        LlavaPluginConfig(**{**config, "vision_feature_select": "cls_patch"})
    assert LlavaPluginConfig(**{**config, "image_grid_pinpoints": None}).image_grid_pinpoints is None


def test_a_model_without_pinpoints_has_no_newline_weight(assembled):
    model, processor = assembled
    assert model.image_newline is None and "image_newline" not in model.state_dict()
    assert processor.image_processor.image_grid_pinpoints is None


def test_an_anyres_checkpoint_loads_and_answers_without_the_package(anyres_model, tmp_path):
    from test_remote_code import in_process, run_standalone

    model, processor = anyres_model
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "anyres.py").read_text() == Path(anyres.__file__).read_text()
    path = tmp_path / "wide.png"
    picture(45, 31).save(path)
    remote = run_standalone(folder, path)
    logits, tokens = in_process(model, processor, path)
    assert remote["module"].startswith("transformers_modules.")
    assert torch.allclose(torch.tensor(remote["logits"]), logits, atol=1e-5) and remote["tokens"] == tokens
