"""llava-convert with parity: llava-hf <-> llava_plugin and original LLaVA -> llava_plugin, on tiny local models."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny_components import original_as_llava_hf, save_llava_hf, save_original_llava
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from llava_plugin import LlavaPluginForConditionalGeneration
from llava_plugin.convert import convert
from llava_plugin.processing_llava_plugin import DEFAULT_SYSTEM

IMAGES = {"square": (40, 40), "odd": (33, 17), "wide": (300, 41)}


def image(size):
    return Image.effect_noise(size, 60).convert("RGB")


def parity(ours, theirs, input_ids, pixel_values):
    with torch.no_grad():
        a = ours(input_ids=input_ids, pixel_values=pixel_values).logits
        b = theirs(input_ids=input_ids, pixel_values=pixel_values).logits
    tokens_a = ours.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=32, do_sample=False, suppress_tokens=[])
    tokens_b = theirs.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=32, do_sample=False, suppress_tokens=[])
    return (a - b).abs().max().item(), torch.equal(tokens_a, tokens_b)


@pytest.fixture(scope="module")
def llava_hf(parts, tmp_path_factory):
    return save_llava_hf(tmp_path_factory.mktemp("llava-hf"), parts["clip"])


def test_llava_hf_to_plugin_matches_transformers(llava_hf, tmp_path):
    assert convert(str(llava_hf), str(tmp_path / "ours")) == "llava-hf"
    ours = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    theirs = LlavaForConditionalGeneration.from_pretrained(llava_hf).eval()
    # transformers' default backend (torchvision), which the conversion records, so the pixels are the ones it makes
    ours_processor, their_processor = AutoProcessor.from_pretrained(tmp_path / "ours"), AutoProcessor.from_pretrained(llava_hf)
    assert ours_processor.image_processor.image_aspect == "pad" and ours_processor.image_processor.pixel_backend == "torchvision"
    for name, size in {**IMAGES, "45x31": (45, 31)}.items():
        picture = image(size)
        mine = ours_processor(images=picture, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
        reference = their_processor(images=picture, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
        assert torch.equal(mine["input_ids"], reference["input_ids"]), name
        assert torch.allclose(mine["pixel_values"], reference["pixel_values"], atol=1e-6), name
        difference, same_tokens = parity(ours, theirs, mine["input_ids"], mine["pixel_values"])
        assert difference < 1e-4 and same_tokens, (name, difference)


def test_two_images_in_two_turns_match_transformers_llava(llava_hf, tmp_path):
    convert(str(llava_hf), str(tmp_path / "ours"))
    ours = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    theirs = LlavaForConditionalGeneration.from_pretrained(llava_hf).eval()
    prompt = "USER: <image>\nWhat is it? ASSISTANT: A shape.</s>USER: And this one? <image>\nASSISTANT:"
    pictures = [image(IMAGES["wide"]), image((45, 31))]
    mine = AutoProcessor.from_pretrained(tmp_path / "ours")(images=pictures, text=prompt, return_tensors="pt")
    reference = AutoProcessor.from_pretrained(llava_hf)(images=pictures, text=prompt, return_tensors="pt")
    assert torch.equal(mine["input_ids"], reference["input_ids"]) and mine["pixel_values"].shape[0] == 2
    assert torch.allclose(mine["pixel_values"], reference["pixel_values"], atol=1e-6)
    difference, same_tokens = parity(ours, theirs, mine["input_ids"], mine["pixel_values"])
    assert difference < 1e-4 and same_tokens, difference


def test_plugin_to_llava_hf_loads_without_remote_code_and_matches(saved_checkpoint, assembled, tmp_path):
    assert convert(str(saved_checkpoint), str(tmp_path / "hf"), to="llava-hf") == "llava_plugin"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    their_processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    ours, ours_processor = assembled
    for name, size in IMAGES.items():
        picture = image(size)
        prompt = ours_processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                                    add_generation_prompt=True)
        mine = ours_processor(images=picture, text=prompt, return_tensors="pt")
        reference = their_processor(images=picture, text=prompt, return_tensors="pt")
        assert torch.equal(mine["input_ids"], reference["input_ids"]), name
        assert torch.allclose(mine["pixel_values"], reference["pixel_values"], atol=1e-6), name
        difference, same_tokens = parity(ours, theirs, mine["input_ids"], mine["pixel_values"])
        assert difference < 1e-4 and same_tokens, (name, difference)


@pytest.fixture(scope="module")
def original(parts, tmp_path_factory):
    """An original LLaVA-1.5 layout: LlavaLlamaForCausalLM config with mm_* keys, .bin weights, no tower inside."""
    folder = tmp_path_factory.mktemp("original")
    return folder, save_original_llava(folder, seed=3)


def test_original_to_plugin_matches_the_published_llava_hf_mapping(original, parts, tmp_path):
    folder, state = original
    assert convert(str(folder), str(tmp_path / "ours"), vision_tower=parts["clip"]) == "original"
    ours = LlavaPluginForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    image_token = processor.image_token_id
    # The llava-hf conversion of the same weights, by the published key mapping, the vocabulary grown by <image>.
    tower = CLIPVisionModel.from_pretrained(parts["clip"])
    mapped = original_as_llava_hf(state, tower.state_dict())
    text = LlamaConfig(**{**ours.config.text_config.to_dict(), "vocab_size": mapped["lm_head.weight"].shape[0]})
    reference = LlavaForConditionalGeneration(LlavaConfig(vision_config=tower.config.to_dict(), text_config=text.to_dict(),
                                                          image_token_index=image_token, image_seq_length=16)).eval()
    missing, unexpected = reference.load_state_dict(mapped, strict=False)
    assert not unexpected and not missing
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                                           add_generation_prompt=True)
    for name, size in IMAGES.items():
        inputs = processor(images=image(size), text=prompt, return_tensors="pt")
        difference, same_tokens = parity(ours, reference, inputs["input_ids"], inputs["pixel_values"])
        assert difference < 1e-4 and same_tokens, (name, difference)


def test_the_original_v1_conversation_is_reproduced_token_for_token(original, parts, tmp_path):
    folder, _ = original
    convert(str(folder), str(tmp_path / "ours"), vision_tower=parts["clip"])
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    # conv_vicuna_v1: system, sep " ", sep2 "</s>", roles USER/ASSISTANT, image first as "<image>\n".
    turns = [("USER", "<image>\nWhat is it?"), ("ASSISTANT", "A red circle."), ("USER", "Where?"), ("ASSISTANT", None)]
    original_prompt = DEFAULT_SYSTEM + " "
    for index, (role, text) in enumerate(turns):
        if text is None:
            original_prompt += role + ":"
        else:
            original_prompt += f"{role}: {text}" + (" " if index % 2 == 0 else "</s>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "Where?"}]
    ours = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == original_prompt
    tokenizer = processor.tokenizer
    assert tokenizer(ours)["input_ids"] == tokenizer(original_prompt)["input_ids"]


def test_unknown_formats_and_existing_destinations_are_refused_cleanly(tmp_path, saved_checkpoint):
    odd = tmp_path / "bert"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"unknown checkpoint format \(model_type 'bert', architectures \['BertModel'\]\)"):
        convert(str(odd), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="exists"):
        convert(str(saved_checkpoint), str(odd), to="llava-hf")
    with pytest.raises(ValueError, match="already a llava_plugin checkpoint"):
        convert(str(saved_checkpoint), str(tmp_path / "again"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bert"]  # no half-written folder left behind


def test_a_failed_conversion_leaves_nothing_behind(original, tmp_path):
    folder, _ = original
    with pytest.raises(OSError):
        convert(str(folder), str(tmp_path / "ours"), vision_tower=str(tmp_path / "no-such-tower"))
    assert list(tmp_path.iterdir()) == []


def test_command_documents_itself():
    result = subprocess.run([sys.executable, "-m", "trainer.convert_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--to {llava_plugin,llava-hf}" in result.stdout and "--vision-tower" in result.stdout


def test_the_chat_engine_takes_a_llava_hf_checkpoint_converting_it_once(llava_hf, tmp_path):
    from engine.chat import resolve_checkpoint

    first = resolve_checkpoint(str(llava_hf), cache=tmp_path)
    stamp = (tmp_path / "converted").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "converted").iterdir())
    assert resolve_checkpoint(str(llava_hf), cache=tmp_path) == first  # cached: not converted again
    assert ((tmp_path / "converted").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "converted").iterdir())) == stamp
    assert json.loads((tmp_path / "converted" / first.split("/")[-1] / "config.json").read_text())["model_type"] == "llava_plugin"


def test_the_app_engine_chats_with_a_llava_hf_checkpoint(llava_hf, tmp_path, monkeypatch):
    import engine.chat

    monkeypatch.setattr(engine.chat, "CACHE", tmp_path)
    chat = engine.chat.ChatEngine(str(llava_hf), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert list(chat.stream(messages, image((40, 30)), temperature=0.0, max_new_tokens=4))
