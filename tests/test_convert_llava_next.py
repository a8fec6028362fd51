"""llava-convert with LLaVA-NeXT (AnyRes): llava-hf's LlavaNextForConditionalGeneration in and out, parity on wide,
tall, square and odd-sized images and on a two-image prompt, pixels as the checkpoint's own processor makes them."""

import json

import pytest
import torch
from PIL import Image
from tiny_components import IMAGE_SIZE, original_as_llava_hf, save_llava_next_hf, save_original_llava
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from llava_plugin import LlavaPluginForConditionalGeneration, anyres
from llava_plugin.convert import convert

PINPOINTS = [[32, 64], [64, 32], [64, 64]]
IMAGES = {"wide": (300, 41), "tall": (41, 300), "square": (40, 40), "odd": (45, 31)}  # PIL sizes: (width, height)
PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"
MISTRAL_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% endif %}"
                "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
                "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
                "{% if m['role'] == 'user' %} [/INST]{% endif %}{% endfor %}")
TWO_IMAGES = "USER: <image>\nWhat is here? ASSISTANT: A shape.</s>USER: And here? <image>\nASSISTANT:"


def image(size, seed=0):
    torch.manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy())


def flat_tiles(pixel_values, image_sizes):
    return anyres.split_tiles(pixel_values, image_sizes, PINPOINTS, IMAGE_SIZE)


def parity(ours, theirs, mine, reference):
    """Max logit difference and whether 24 greedy tokens agree; each model gets its own processor's inputs."""
    with torch.no_grad():
        a = ours(**mine).logits
        b = theirs(**reference).logits
    tokens_a = ours.generate(**mine, max_new_tokens=24, do_sample=False, suppress_tokens=[])
    tokens_b = theirs.generate(**reference, max_new_tokens=24, do_sample=False)
    return (a - b).abs().max().item(), torch.equal(tokens_a, tokens_b)


@pytest.fixture(scope="module")
def llava_next(parts, tmp_path_factory):
    """A tiny llava-hf LLaVA-NeXT checkpoint: CLIP tower, LLaMA, three grid pinpoints of the tower's 32px tiles."""
    return save_llava_next_hf(tmp_path_factory.mktemp("llava-next-hf"), parts["clip"], PINPOINTS, MISTRAL_LIKE)


def compare(ours, ours_processor, theirs, their_processor, pictures, prompt, name):
    mine = ours_processor(images=pictures, text=prompt, return_tensors="pt")
    reference = their_processor(images=pictures, text=prompt, return_tensors="pt")
    assert torch.equal(mine["input_ids"], reference["input_ids"]), name
    assert torch.equal(mine["image_sizes"], reference["image_sizes"]), name
    assert torch.allclose(mine["pixel_values"], flat_tiles(reference["pixel_values"], reference["image_sizes"]), atol=1e-6), name
    difference, same_tokens = parity(ours, theirs, dict(mine), dict(reference))
    assert difference < 1e-4 and same_tokens, (name, difference)


def test_llava_next_hf_to_plugin_matches_transformers(llava_next, tmp_path):
    assert convert(str(llava_next), str(tmp_path / "ours")) == "llava-hf"
    ours = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    theirs = LlavaNextForConditionalGeneration.from_pretrained(llava_next).eval()
    assert ours.config.image_grid_pinpoints == PINPOINTS and torch.equal(ours.image_newline, theirs.model.image_newline)
    # Both loaded as a user would: transformers' default backend (torchvision) for theirs, the one recorded for ours.
    ours_processor, their_processor = AutoProcessor.from_pretrained(tmp_path / "ours"), AutoProcessor.from_pretrained(llava_next)
    assert ours_processor.image_processor.pixel_backend == "torchvision" and ours_processor.chat_template == MISTRAL_LIKE
    for name, size in IMAGES.items():
        compare(ours, ours_processor, theirs, their_processor, [image(size)], PROMPT, name)
    compare(ours, ours_processor, theirs, their_processor, [image(IMAGES["wide"]), image(IMAGES["tall"], seed=1)], TWO_IMAGES, "two images")


@pytest.fixture(scope="module")
def anyres_checkpoint(parts, tmp_path_factory):
    torch.manual_seed(1)
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"],
                                                                           image_grid_pinpoints=PINPOINTS)
    folder = tmp_path_factory.mktemp("anyres")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_an_anyres_plugin_model_exports_to_llava_next_and_matches(anyres_checkpoint, tmp_path):
    assert convert(str(anyres_checkpoint), str(tmp_path / "hf"), to="llava-hf") == "llava_plugin"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == PINPOINTS and "auto_map" not in config
    theirs = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours = LlavaPluginForConditionalGeneration.from_pretrained(anyres_checkpoint).eval()
    assert torch.equal(ours.image_newline, theirs.model.image_newline)
    ours_processor = AutoProcessor.from_pretrained(anyres_checkpoint)
    # ours resizes with PIL; a saved llava-hf processor cannot name a backend, so theirs is asked for PIL explicitly
    their_processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    for name, size in IMAGES.items():
        compare(ours, ours_processor, theirs, their_processor, [image(size)], PROMPT, name)
    compare(ours, ours_processor, theirs, their_processor, [image(IMAGES["square"]), image(IMAGES["odd"], seed=2)], TWO_IMAGES, "two images")
    # and back again: the round trip gives the same weights
    assert convert(str(tmp_path / "hf"), str(tmp_path / "back")) == "llava-hf"
    back = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path / "back")
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_the_app_engine_chats_with_a_llava_next_checkpoint_converting_it_on_load(llava_next, tmp_path, monkeypatch):
    import engine.chat

    monkeypatch.setattr(engine.chat, "CACHE", tmp_path)
    chat = engine.chat.ChatEngine(str(llava_next), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    picture = image(IMAGES["wide"])
    answer = list(chat.stream(messages, picture, temperature=0.0, max_new_tokens=6))[-1]
    theirs = LlavaNextForConditionalGeneration.from_pretrained(llava_next).eval()
    processor = AutoProcessor.from_pretrained(llava_next)
    inputs = processor(images=picture, text=processor.apply_chat_template(messages), return_tensors="pt")
    tokens = theirs.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def original_next(parts, tmp_path_factory):
    """The original v1.6 layout: LlavaLlamaForCausalLM with anyres / spatial_unpad, its pinpoints as (width, height)
    (one tall canvas, so a swap would show), `model.image_newline`, .bin weights, no tower inside."""
    folder = tmp_path_factory.mktemp("original-next")
    state = save_original_llava(folder, seed=4, max_position_embeddings=512, extra_weights={"model.image_newline": torch.randn(32)},
                                image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                                image_grid_pinpoints="[(32, 64), (64, 64)]")
    return folder, state


def test_the_original_v16_layout_converts_to_the_llava_next_mapping_of_its_weights(original_next, parts, tmp_path):
    folder, state = original_next
    assert convert(str(folder), str(tmp_path / "ours"), vision_tower=parts["clip"]) == "original"
    ours = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    assert ours.config.image_grid_pinpoints == [[64, 32], [64, 64]] and processor.image_processor.pixel_backend == "pil"
    # The original tiles a 41x300 (tall) image on its (width 32, height 64) canvas: one column of two tiles.
    assert anyres.tile_grid(300, 41, ours.config.image_grid_pinpoints, IMAGE_SIZE) == (2, 1)
    # The same weights in transformers' LLaVA-NeXT, the vocabulary grown by <image> as the converter does.
    tower = CLIPVisionModel.from_pretrained(parts["clip"])
    mapped = original_as_llava_hf(state, tower.state_dict())
    text = LlamaConfig(**{**ours.config.text_config.to_dict(), "vocab_size": mapped["lm_head.weight"].shape[0]})
    reference = LlavaNextForConditionalGeneration(LlavaNextConfig(
        vision_config=tower.config.to_dict(), text_config=text.to_dict(), image_token_index=processor.image_token_id,
        image_grid_pinpoints=[[64, 32], [64, 64]])).eval()
    missing, unexpected = reference.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected
    for name, size in IMAGES.items():
        inputs = processor(images=image(size), text=PROMPT, return_tensors="pt")
        difference, same_tokens = parity(ours, reference, dict(inputs), dict(inputs))
        assert difference < 1e-4 and same_tokens, (name, difference)


def test_an_original_anyres_layout_without_unpadding_is_refused(original_next, parts, tmp_path):
    folder, _ = original_next
    odd = tmp_path / "flat"
    odd.mkdir()
    for path in folder.iterdir():
        (odd / path.name).write_bytes(path.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "mm_patch_merge_type": "spatial"}))
    with pytest.raises(ValueError, match="mm_patch_merge_type 'spatial'; only 'spatial_unpad'"):
        convert(str(odd), str(tmp_path / "out"), vision_tower=parts["clip"])
