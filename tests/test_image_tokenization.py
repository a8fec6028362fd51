"""Tokens around <image> as the original LLaVA produced them: it tokenized the text between images piece by piece.
A Llama-2-style SentencePiece tokenizer (BPE over "▁" words with byte fallback) is trained here and saved with
`legacy` true and false, the setting Llama-2 checkpoints ship in tokenizer_config.json."""

import json

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoProcessor, AutoTokenizer, LlamaTokenizer

from llava_plugin import LlavaPluginImageProcessor, LlavaPluginProcessor
from test_convert import original  # noqa: F401  (the original LLaVA-1.5 checkpoint layout)
from trainer.data import encode, parse_record, to_messages

CORPUS = ["A chat between a curious user and an artificial intelligence assistant. USER: What is shown here? ASSISTANT: A red circle.",
          "Describe the image. The picture shows two blue squares and a green triangle. Where is it? At the top left."]
SEQ = 3  # image tokens per image


def sentencepiece_tokenizer(folder, legacy: bool):
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]  # Llama's byte-fallback pieces
    bpe.train_from_iterator(CORPUS * 50, trainers.BpeTrainer(vocab_size=700, special_tokens=specials))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=legacy).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # As Llama-2's files carry them (transformers writes neither back).
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy, "add_bos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def processor_for(tokenizer, split: bool) -> LlavaPluginProcessor:
    return LlavaPluginProcessor(LlavaPluginImageProcessor(image_size=32), tokenizer, image_seq_length=SEQ, split_text_at_images=split)


def original_ids(tokenizer, prompt: str) -> list[int]:
    """The original's tokenizer_image_token, each image expanded to SEQ tokens: every piece between images is
    tokenized alone, and only the first keeps its BOS."""
    pieces = [tokenizer(piece)["input_ids"] for piece in prompt.split("<image>")]
    offset = int(pieces[0][:1] == [tokenizer.bos_token_id])
    ids = pieces[0][:offset]
    for number, piece in enumerate(pieces):
        ids += ([tokenizer.convert_tokens_to_ids("<image>")] * SEQ if number else []) + piece[offset:]
    return ids


def conversation():
    return parse_record({"id": "000000033471", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "What is shown here?\n<image>"}, {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."}]}, "t", seed=0)


@pytest.mark.parametrize("legacy", [True, False])
def test_prompts_tokenize_as_the_original_did_with_either_legacy_setting(tmp_path, legacy):
    tokenizer = sentencepiece_tokenizer(tmp_path, legacy)
    processor = processor_for(tokenizer, split=True)
    prompt = processor.apply_chat_template(to_messages(conversation(), seed=0)[:3], add_generation_prompt=True)
    ids = processor(images=[Image.new("RGB", (8, 8))], text=prompt)["input_ids"][0]
    assert ids == original_ids(tokenizer, prompt)
    joined = processor_for(tokenizer, split=False)(images=[Image.new("RGB", (8, 8))], text=prompt)["input_ids"][0]
    space = tokenizer.convert_tokens_to_ids("▁")
    after_image = ids.index(processor.image_token_id) + SEQ
    if legacy:  # the prefix after a special token is already there: both ways agree
        assert joined == ids
    else:  # the original saw "▁" after the image (Llama-2's id 29871); tokenizing the prompt whole loses it
        assert ids[after_image] == space and joined == ids[:after_image] + ids[after_image + 1:]


def test_training_labels_and_inputs_follow_the_original_tokens(tmp_path):
    tokenizer = sentencepiece_tokenizer(tmp_path, legacy=False)
    processor = processor_for(tokenizer, split=True)
    record = conversation()
    encoded = encode(record, processor, seed=0, max_length=512, image_folder=".", load_pixels=False)
    text = processor.apply_chat_template(to_messages(record, seed=0))
    assert encoded.input_ids.tolist() == original_ids(tokenizer, text)
    learned = tokenizer.decode(encoded.input_ids[encoded.labels != -100])
    assert learned == "A red circle.</s> At the top left.</s>"  # (the decoder drops the first "▁")


def test_the_setting_is_saved_with_the_processor(tmp_path):
    processor = processor_for(sentencepiece_tokenizer(tmp_path / "tokenizer", legacy=False), split=True)
    processor.save_pretrained(tmp_path / "saved")
    assert AutoProcessor.from_pretrained(tmp_path / "saved").split_text_at_images is True


def test_a_checkpoint_imported_from_the_original_tokenizes_as_it_was_trained(original, parts, tmp_path):  # noqa: F811
    from llava_plugin.convert import convert

    folder, _ = original
    convert(str(folder), str(tmp_path / "ours"), vision_tower=parts["clip"])
    assert AutoProcessor.from_pretrained(tmp_path / "ours").split_text_at_images is True
