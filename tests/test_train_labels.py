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
            prompt_ids = processor(images=[processor_image()] if record.image else None, text=prompt)["input_ids"][0]
            if list(encoded.input_ids[:start]) != list(prompt_ids):
                mismatches.append((record.id, f"prompt before answer at {start}"))
    assert mismatches == []


def processor_image():
    from PIL import Image

    return Image.new("RGB", (1, 1))


def test_image_is_placed_before_or_after_the_question_unless_the_data_places_it():
    placed = [to_messages(parse_record({"id": f"r{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, "t", 0), seed=0)[0]["content"][0]["type"]
        for i in range(50)]
    assert set(placed) == {"image", "text"}
    kept = to_messages(parse_record({"id": "k", "image": "a.png", "conversations": [
        {"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": "A."}]}, "t", 0), seed=0)
    assert kept[0]["content"] == [{"type": "text", "text": "Q?"}, {"type": "image"}]


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
