"""The chat engine with an AnyRes model: the image's tokens follow its size, the tower runs once per session, and
later turns reuse cache and features yet answer as a full recompute and as transformers' generate do."""

import pytest
import torch
from PIL import Image
from tiny_components import user_turn

from engine import ChatEngine
from llava_plugin import LlavaPluginForConditionalGeneration

WIDE = Image.effect_noise((45, 31), 60).convert("RGB")


@pytest.fixture(scope="module")
def engine(parts, tmp_path_factory):
    torch.manual_seed(2)
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"],
                                                                           image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    folder = tmp_path_factory.mktemp("anyres-engine")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return ChatEngine(str(folder), device="cpu")


def reply(engine, messages, session=None):
    return list(engine.stream(messages, WIDE, temperature=0.0, max_new_tokens=6, session_id=session))[-1]


def test_turns_reuse_the_features_and_answer_as_generate_does(engine):
    runs = []
    hook = engine.model.vision_tower.register_forward_hook(lambda *args: runs.append(1))
    messages = [user_turn("What is in the picture?")]
    try:
        for turn in range(3):
            answer = reply(engine, messages, session="s")
            prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = engine.processor(images=WIDE, text=prompt, return_tensors="pt")
            tokens = engine.model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
            assert answer == engine.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(), turn
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And then {turn}?"}]
    finally:
        hook.remove()
    assert len(runs) == 3 + 1  # generate's three recomputes, and once for the whole session


def test_a_prompt_lays_out_the_processors_tokens_without_its_pixels(engine):
    prompt = engine.prompter.prompt([user_turn("Why?")], WIDE)
    expected = engine.processor(images=WIDE, text=prompt.text)["input_ids"]
    ids = prompt.ids
    assert ids.tolist() == expected and prompt.sizes == [(WIDE.height, WIDE.width)]
    assert int((ids == engine.processor.image_token_id).sum()) == engine.processor.anyres_token_count(31, 45) != 16


def test_a_conversation_without_an_image_answers_as_generate_does(engine):
    messages = [{"role": "user", "content": "What is in the picture?"}]
    answer = list(engine.stream(messages, None, temperature=0.0, max_new_tokens=6))[-1]
    prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = engine.processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert engine.model.config.image_token_id not in ids[0].tolist()
    tokens = engine.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert answer == engine.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
