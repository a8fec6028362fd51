"""Labels come from the chat template: exactly the answers (and their </s>) are learned, and what the model is
trained on is token for token what it sees at inference. Golden checks over 1,000 generated conversations."""

import random

import pytest

from trainer.data import DataError, Record, encode, parse_record, to_messages

WORDS = ("the", "red", "circle", "is", "at", "top", "left", "How", "many", "shapes", "?", "3", "42", "café", "naïve",
         "(yes)", "no.", "A:", "USER", "ASSISTANT", "don't", "x=1", "—", "blue", "square", "\u00e9t\u00e9", "zoo")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def conversation(rng: random.Random, index: int) -> Record:
    turns = []
    if rng.random() < 0.2:
        turns.append({"from": "system", "value": "Be brief."})
    for _ in range(rng.randint(1, 4)):
        turns += [{"from": "human", "value": sentence(rng)}, {"from": "gpt", "value": sentence(rng)}]
    return parse_record({"id": f"c{index}", "image": "x.png" if rng.random() < 0.7 else None, "conversations": turns}, "gen", seed=0)


def test_zero_tokenization_mismatches_over_1000_conversations(assembled):
    _, processor = assembled
    rng, mismatches, checked = random.Random(0), [], 0
    eos = processor.tokenizer.eos_token
    while checked < 1000:
        record = conversation(rng, checked)
        try:
            encoded = encode(record, processor, seed=0, max_length=processor.tokenizer.model_max_length,
                             image_folder=".", load_pixels=False)
        except DataError:  # longer than the tiny model's 256-token context: training skips those too
            continue
        checked += 1
        learned = encoded.input_ids[encoded.labels != -100]
        answers = [text for role, text in record.conversations if role == "assistant"]
        if processor.tokenizer.decode(learned) != "".join(f" {answer}{eos}" for answer in answers):
            mismatches.append((record.id, "labels"))
            continue
        # Inference: the prompt before each answer must be a prefix of the training ids, and the next training token
        # must be the first label of that answer.
        messages = to_messages(record, seed=0)
        starts = [position for position in range(len(encoded.labels))
                  if encoded.labels[position] != -100 and (position == 0 or encoded.labels[position - 1] == -100)]
        assistant_at = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        for start, cut in zip(starts, assistant_at):
            prompt = processor.apply_chat_template(messages[:cut], add_generation_prompt=True)
            prompt_ids = processor(images=[processor_image()] * len(record.images) or None, text=prompt)["input_ids"][0]
            if list(encoded.input_ids[:start]) != list(prompt_ids):
                mismatches.append((record.id, f"prompt before answer at {start}"))
    assert mismatches == []


def processor_image():
    from PIL import Image

    return Image.new("RGB", (1, 1))


# A record of llava_instruct_150k as released: its <image> after the question, as in about half of them.
INSTRUCT_RECORD = {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
    {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
    {"from": "gpt", "value": "The bus in the image is white and red."},
    {"from": "human", "value": "What feature can be seen on the back of the bus?"},
    {"from": "gpt", "value": "The back of the bus features an advertisement."}]}


def test_the_image_goes_to_the_front_of_its_question_as_the_original_preprocessing_puts_it(assembled):
    _, processor = assembled
    record = parse_record(INSTRUCT_RECORD, "llava_instruct_150k.json#0", seed=0)
    prompt = processor.apply_chat_template(to_messages(record, seed=0))
    assert "USER: <image>\nWhat are the colors of the bus in the image? ASSISTANT: The bus" in prompt
    kept = to_messages(record, seed=0, placement="keep")
    assert kept[0]["content"] == [{"type": "text", "text": "What are the colors of the bus in the image?"}, {"type": "image"}]


def test_random_placement_puts_an_unplaced_image_before_or_after_the_question():
    placed = [to_messages(parse_record({"id": f"r{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, "t", 0), seed=0, placement="random")[0]["content"][0]["type"]
        for i in range(50)]
    assert set(placed) == {"image", "text"}


def test_the_image_after_text_template_keeps_its_own_rule(parts):
    from llava_plugin import LlavaPluginForConditionalGeneration

    _, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"], projector="linear",
                                                                        system_prompt="Shapes.", image_after_text=True)
    record = parse_record(INSTRUCT_RECORD, "t", seed=0)
    assert processor.apply_chat_template(to_messages(record, seed=0)).startswith(
        "Shapes. USER: What are the colors of the bus in the image?\n<image> ASSISTANT:")


def test_caption_pairs_become_brief_description_turns():
    record = parse_record({"id": "p", "image": "a.png", "caption": "A dog."}, "t", seed=0)
    (user, question), (assistant, answer) = record.conversations
    assert (user, assistant, answer) == ("user", "assistant", "A dog.") and question.endswith(".")


@pytest.mark.parametrize("raw, message", [
    ({"id": "n", "image": "a.png", "conversations": [{"from": "human", "value": "Q?"}]}, "no assistant turn"),
    ({"id": "m", "conversations": [{"from": "human", "value": "<image> Q?"}, {"from": "gpt", "value": "A."}]}, "1 <image> markers for 0"),
    ({"id": "b", "conversations": [{"from": "robot", "value": "Q?"}]}, "turn 0 needs 'from'"),
])
def test_unusable_records_are_data_errors_naming_the_record(raw, message):
    with pytest.raises(DataError, match=message):
        to_messages(parse_record(raw, "file.json#3", seed=0), seed=0)


def test_dataset_renders_each_records_tokens_once_and_serves_them_unchanged(assembled, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    import trainer.dataset
    from trainer.dataset import LlavaDataset
    from trainer.feature_cache import FeatureCache

    _, processor = assembled
    cache = FeatureCache(str(tmp_path), "key")
    cache.folder.mkdir(parents=True)
    save_file({"features": torch.ones(1, 4, 8)}, str(cache.path("x.png")))
    rng = random.Random(1)
    records = [conversation(rng, index) for index in range(30)]
    records = [record for record in records if record.images]
    long_answer = " ".join(["circle"] * 400)
    records.append(parse_record({"id": "long", "image": "x.png", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": long_answer}]}, "gen", seed=0))
    calls = []
    real_encode = trainer.dataset.encode
    monkeypatch.setattr(trainer.dataset, "encode", lambda record, *args, **kwargs: calls.append(record.id) or real_encode(record, *args, **kwargs))
    dataset = LlavaDataset(records, processor, seed=0, max_length=200, image_folder=".", feature_cache=cache)
    first = [dataset[index] for index in range(len(records))]
    second = [dataset[index] for index in range(len(records))]
    assert sorted(calls) == sorted(record.id for record in records)  # once each, the unusable one included
    assert first[-1]["skip"].startswith("gen (long): ") and second[-1] == first[-1]
    served = 0
    for record, a, b in zip(records[:-1], first, second):
        try:
            expected = real_encode(record, processor, 0, 200, ".", load_pixels=False)
        except DataError as error:
            assert a == b == {"id": record.id, "skip": str(error)}
            continue
        served += 1
        for item in (a, b):
            assert item["input_ids"].dtype == torch.long
            assert torch.equal(item["input_ids"], expected.input_ids) and torch.equal(item["labels"], expected.labels)
            assert item["vision_features"].shape == (1, 4, 8)
    assert served >= 10


# A record of LCS-558K (blip_laion_cc_sbu_558k.json) as released.
CAPTION_RECORD = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
    {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}


def test_the_plain_template_is_image_caption_newline_and_learns_the_caption_alone(assembled):
    _, processor = assembled
    record = parse_record(CAPTION_RECORD, "blip_laion_cc_sbu_558k.json#0", seed=0)
    encoded = encode(record, processor, seed=0, max_length=256, image_folder=".", load_pixels=False, template="plain")
    caption = CAPTION_RECORD["conversations"][1]["value"]
    image_ids = [processor.image_token_id] * processor.image_seq_length
    assert encoded.input_ids.tolist() == image_ids + processor.tokenizer(caption + "\n", add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(encoded.input_ids[encoded.labels != -100]) == caption + "\n"
    assert (encoded.labels[:len(image_ids)] == -100).all()
    chat = encode(record, processor, seed=0, max_length=256, image_folder=".", load_pixels=False)  # the paper's form stays
    assert "Render a clear and concise summary" in processor.tokenizer.decode(chat.input_ids)


def test_the_plain_template_refuses_a_conversation(assembled):
    _, processor = assembled
    record = parse_record({"id": "c", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."},
                                                                          {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "B."}]}, "f.json#4", 0)
    with pytest.raises(DataError, match="f.json#4 \\(c\\): the plain template takes one question and one answer"):
        encode(record, processor, seed=0, max_length=256, image_folder=".", load_pixels=False, template="plain")


@pytest.mark.parametrize("preset, template", [("llava-v1-stage1", "plain"), ("llava-1.5-stage1", "plain"),
                                              ("llava-v1-stage2", "chat"), ("llava-1.5-stage2", "chat")])
def test_the_stage_one_presets_train_in_the_plain_format(preset, template):
    from trainer.settings import parse_settings

    settings = parse_settings(["--preset", preset, "--vision", "v", "--llm", "l", "--data", "d.json"])
    assert settings.template == template


def test_llava_train_stage_one_in_the_plain_format(parts, tmp_path):
    import json
    import subprocess
    import sys

    from tiny_components import save_tiny_world

    world = save_tiny_world(tmp_path / "world", images=4)
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "--stage", "1", "--vision", parts["clip"], "--llm", parts["llm"],
                             "--data", str(world / "captions.json"), "--image-folder", str(world / "images"), "--template", "plain",
                             "--output", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "2", "--save-every", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "train_metrics.json").read_text())["samples"] == 4 and "skipped" not in result.stdout
    # The saved model keeps its chat template for stage 2 and chat; plain was the training format only.
    assert "USER: " in (tmp_path / "out" / "chat_template.jinja").read_text()
