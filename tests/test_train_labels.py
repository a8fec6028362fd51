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
