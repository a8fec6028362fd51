import pytest
import torch
from PIL import Image

from llava_plugin import llava_v1_chat_template
from llava_plugin.processing_llava_plugin import DEFAULT_SYSTEM
from tiny_components import user_turn

IMAGE = Image.new("RGB", (40, 30), (200, 30, 30))


def test_single_turn_prompt_is_llava_v1(assembled):
    _, processor = assembled
    prompt = processor.apply_chat_template([user_turn("What is in the picture?")], add_generation_prompt=True)
    assert prompt == f"{DEFAULT_SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT:"


def test_multi_turn_conversation_is_llava_v1(assembled):
    _, processor = assembled
    messages = [
        {"role": "system", "content": "Be brief."},
        user_turn("What colour?", image_first=False),
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": [{"type": "text", "text": "One."}]},
    ]
    text = processor.apply_chat_template(messages)
    assert text == "Be brief. USER: What colour?\n<image> ASSISTANT: Red.</s>USER: How many? ASSISTANT: One.</s>"


def test_roles_must_alternate(assembled):
    _, processor = assembled
    with pytest.raises(Exception, match="alternate"):
        processor.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_assistant_mask_marks_exactly_the_answers_and_their_end_token(assembled):
    _, processor = assembled
    answers = ["A red circle on a white background.", "There are two shapes.", "The answer is yes."]
    messages = [user_turn("What is in the picture?")]
    messages[0]["content"][0]["image"] = IMAGE
    for index, answer in enumerate(answers):
        if index:
            messages.append({"role": "user", "content": f"Question {index}?"})
        messages.append({"role": "assistant", "content": answer})
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert int((ids == processor.image_token_id).sum()) == processor.image_seq_length
    assert not mask[ids == processor.image_token_id].any()
    learned = processor.tokenizer.decode(ids[mask])
    assert learned == "".join(f" {answer}</s>" for answer in answers)


def test_each_image_marker_expands_to_the_tower_sequence_length(assembled):
    _, processor = assembled
    out = processor(images=[IMAGE, IMAGE], text="<image> and <image>", return_tensors="pt")
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 2 * processor.image_seq_length == 32
    assert out["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("text, images", [("<image> <image>", [IMAGE]), ("no marker", [IMAGE]), ("<image>", None)])
def test_marker_and_image_counts_must_agree(assembled, text, images):
    _, processor = assembled
    with pytest.raises(ValueError, match="image"):
        processor(images=images, text=text)


def test_a_prompt_longer_than_the_context_raises(assembled):
    _, processor = assembled
    context = processor.tokenizer.model_max_length
    assert context == 256  # capped at the tiny LM's max_position_embeddings
    with pytest.raises(ValueError, match=f"context is {context}"):
        processor(images=IMAGE, text="<image>" + " shape" * 300)


def test_truncation_is_explicit_and_keeps_images_whole(assembled):
    _, processor = assembled
    out = processor(images=IMAGE, text="<image>" + " shape" * 300, truncation=True, max_length=64)
    assert len(out["input_ids"][0]) == 64
    assert out["input_ids"][0].count(processor.image_token_id) == processor.image_seq_length
    with pytest.raises(ValueError, match="truncation"):
        processor(images=IMAGE, text=" shape" * 60 + "<image>", truncation=True, max_length=64)


def test_padding_in_a_batch_does_not_count_against_the_context(assembled):
    _, processor = assembled
    out = processor(images=[IMAGE, IMAGE], text=["<image> hi", "<image>" + " shape" * 20], padding=True, return_tensors="pt")
    assert out["input_ids"].shape[0] == 2 and torch.equal(out["attention_mask"].sum(1) < out["input_ids"].shape[1], torch.tensor([True, False]))


def test_processor_round_trips(saved_checkpoint, assembled):
    from transformers import AutoProcessor

    _, processor = assembled
    loaded = AutoProcessor.from_pretrained(saved_checkpoint)
    assert type(loaded).__name__ == "LlavaPluginProcessor"
    assert loaded.image_seq_length == processor.image_seq_length and loaded.chat_template == processor.chat_template
    text = loaded.apply_chat_template([user_turn("Hi")], add_generation_prompt=True)
    assert torch.equal(loaded(images=IMAGE, text=text, return_tensors="pt")["input_ids"],
                       processor(images=IMAGE, text=text, return_tensors="pt")["input_ids"])


def test_with_the_image_after_the_text_a_prompt_moves_it_after_the_newest_question(assembled):
    _, processor = assembled
    template = llava_v1_chat_template("Shapes.", image_after_text=True)
    first = [user_turn("What colour?")]
    conversation = [*first, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "How many?"}]
    # Rendered for training, the conversation keeps the image where the messages put it...
    assert processor.apply_chat_template([*conversation, {"role": "assistant", "content": "One."}], chat_template=template) == \
        "Shapes. USER: What colour?\n<image> ASSISTANT: Red.</s>USER: How many? ASSISTANT: One.</s>"
    # ...a prompt for the next answer asks the newest question with the image after it; a first question is unchanged.
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, chat_template=template)
    assert prompt == "Shapes. USER: What colour? ASSISTANT: Red.</s>USER: How many?\n<image> ASSISTANT:"
    assert processor.apply_chat_template(first, add_generation_prompt=True, chat_template=template) == \
        "Shapes. USER: What colour?\n<image> ASSISTANT:"
    ids = processor(images=IMAGE, text=prompt)["input_ids"][0]
    image = [index for index, token in enumerate(ids) if token == processor.image_token_id]
    assert len(image) == processor.image_seq_length and image == list(range(image[0], image[0] + len(image)))
    assert processor.tokenizer.decode(ids[:image[0]]).endswith("How many?\n")
