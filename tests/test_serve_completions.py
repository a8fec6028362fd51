"""llava-serve's /v1/completions (a prompt continued as it is, no chat template) through the official openai client
on loopback, and the raw continuation's text."""

import time

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.answer_text import AnswerText, Tokens
from engine.decoding import Sampling
from test_serve import MODEL, client, engine, refused  # noqa: F401

PROMPT = "A chat about a picture of shapes. USER: Describe the picture. ASSISTANT:"


def complete(client, prompt, **options) -> openai.types.Completion:
    return client.completions.create(model=MODEL, prompt=prompt, **{"temperature": 0, "max_tokens": 12, **options})


def greedy_continuation(engine, ids: list[int], count: int) -> list[int]:
    """The model's greedy next tokens after `ids`, one forward per token over the whole text (no cache, no batch)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(count):
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            if token in engine.stop_ids:
                break
            ids.append(token)
    return ids


def test_a_text_prompt_is_continued_exactly_as_the_model_continues_it(client, engine):
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    whole = greedy_continuation(engine, ids, 12)
    expected = tokenizer.decode(whole)[len(tokenizer.decode(ids)):]
    answer = complete(client, PROMPT)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == expected and expected.startswith(" ")  # the space before the answer's first word kept
    ended = answer.choices[0].finish_reason == "stop"  # usage counts the end token drawn, as vLLM's
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == len(whole) - len(ids) + ended
    # as token ids, and as the batch of one that clients which batch send: the same answer
    assert complete(client, ids).choices[0].text == expected
    assert complete(client, [ids]).choices[0].text == expected
    assert complete(client, [PROMPT]).choices[0].text == expected
    # OpenAI's default length for a completion is 16 tokens
    assert complete(client, PROMPT, max_tokens=None).usage.completion_tokens <= 16


def test_a_streamed_completion_equals_the_whole_and_a_stop_string_cuts_it_exactly(client):
    whole = complete(client, PROMPT).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == whole
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # a stop string: the text up to it, its spaces kept (a chat answer's is stripped; a completion's is not)
    word = whole.split()[1]
    cut = complete(client, PROMPT, stop=[word])
    assert cut.choices[0].text == whole[: whole.index(word)] and cut.choices[0].text.endswith(" ")
    assert cut.choices[0].finish_reason == "stop"


def test_prompts_it_cannot_answer_get_openai_errors_that_name_the_prompt(client, engine):
    image_token = engine.processor.image_token_id
    for prompt, wanted in [(["one prompt"] * 65, "65 prompts in one request; at most 64"),
                           ("<image> what is this?", "image token"),
                           ([5, image_token, 7], "image token"),
                           ([5, 100_000], "outside the model's vocabulary"),
                           ([-1], "outside the model's vocabulary"),
                           ([], "the prompt is empty"),
                           ([[]], "the prompt is empty")]:
        error = refused(lambda: complete(client, prompt))
        assert error.status_code == 400 and wanted in error.body["message"] and error.body["param"] == "prompt", (prompt, error.body)
    too_long = refused(lambda: complete(client, [5] * 1100))  # the model's context is 1024
    assert too_long.status_code == 400 and too_long.body["code"] == "context_length_exceeded"
    for extra in ({"best_of": 2}, {"suffix": "!"}):
        error = refused(lambda: complete(client, PROMPT, extra_body=extra))
        assert error.status_code == 400 and error.body["code"] == "unsupported_parameter" and error.body["param"] == next(iter(extra))
    assert complete(client, PROMPT, extra_body={"echo": False, "logprobs": None, "n": 1}).choices[0].text  # neutral values pass
    base_url = str(client.base_url).rstrip("/")
    for body, param in [({"model": MODEL, "prompt": [True]}, "prompt.0"), ({"model": MODEL}, "prompt"),
                        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens")]:
        response = httpx.post(f"{base_url}/completions", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert refused(lambda: client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")).status_code == 404


class _Dropping:
    """A tokenizer that, as SentencePiece's do, drops the space of a text's first word when decoding."""

    def __init__(self):
        vocabulary = {word: index for index, word in enumerate(["[UNK]", "▁The", "▁circle", "▁is", "▁red", "."])}
        tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
        tokenizer.decoder = decoders.Metaspace()
        self.fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)

    def ids(self, text: str) -> list[int]:
        return self.fast(text, add_special_tokens=False)["input_ids"]


def test_a_continuation_keeps_the_space_a_tokenizer_drops_from_a_texts_first_word():
    tokenizer = _Dropping()
    prompt, answer = tokenizer.ids("The circle is"), tokenizer.ids(" red.")
    assert tokenizer.fast.decode(answer) == "red."  # decoded alone, the space is gone
    text = AnswerText(tokenizer.fast, context=prompt[-6:])
    first = text.add(Tokens(answer[:1], prompt_tokens=3, cached_tokens=0))
    last = text.add(Tokens(answer[1:], prompt_tokens=3, cached_tokens=0, finish_reason="stop"))
    assert (first.text, last.text) == (" red", " red.")
    # a chat answer is decoded alone and stripped, as before
    assert AnswerText(tokenizer.fast).add(Tokens(answer, prompt_tokens=3, cached_tokens=0, finish_reason="stop")).text == "red."


def test_the_engine_completes_in_process_as_the_server_does(client, engine):
    progresses = list(engine.complete(PROMPT, Sampling(0.0, 1.0, 12)))
    assert progresses[-1].text == complete(client, PROMPT).choices[0].text and progresses[-1].finish_reason


@pytest.mark.parametrize("messages, where", [
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Answer in French."}], "messages.1"),
    ([{"role": "system", "content": "One."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
      {"role": "system", "content": "Two."}, {"role": "user", "content": "Why?"}], "messages.3"),
])
def test_a_system_message_after_the_first_is_refused_not_rendered_as_an_answer(client, messages, where):
    """LLaVA's prompt has one system text, first; the template rendered a later one as an assistant's turn."""
    error = refused(lambda: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4))
    assert error.status_code == 400 and where in error.body["message"] and "system message" in error.body["message"]


def test_lm_evals_generate_until_payload_with_five_stop_strings_is_answered(client, engine):
    """lm-eval's local-completions sends the prompt as a batch of one token list, seed 1234, and its task's whole
    `until` list plus the end-of-text string: more than OpenAI's 4 stop strings."""
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    whole = complete(client, ids, max_tokens=16).choices[0].text
    word = whole.split()[2]
    until = ["\n\n", "Question:", "Q:", "</s>", word]
    payload = {"prompt": [ids], "model": MODEL, "max_tokens": 16, "temperature": 0, "stop": until, "seed": 1234}
    answer = httpx.post(str(client.base_url) + "completions", json=payload, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == whole[: whole.index(word)]
    payload["stop"] = [f"stop {index}" for index in range(17)]
    refusal = httpx.post(str(client.base_url) + "completions", json=payload, timeout=60)
    assert refusal.status_code == 400 and refusal.json()["error"]["param"] == "stop"


def test_several_prompts_in_one_request_are_answered_a_choice_each_as_alone(client, engine):
    """lm-eval's local-completions with batch_size > 1 sends its batch so; vLLM answers a choice per prompt."""
    tokenizer = engine.processor.tokenizer
    texts = [PROMPT, "A picture of shapes. USER: What color is the circle? ASSISTANT:", PROMPT + " The"]
    alone = [complete(client, text) for text in texts]
    together = complete(client, texts)
    assert [choice.index for choice in together.choices] == [0, 1, 2]
    assert [choice.text for choice in together.choices] == [answer.choices[0].text for answer in alone]
    assert [choice.finish_reason for choice in together.choices] == [answer.choices[0].finish_reason for answer in alone]
    assert together.usage.completion_tokens == sum(answer.usage.completion_tokens for answer in alone)
    assert together.usage.prompt_tokens == sum(answer.usage.prompt_tokens for answer in alone)
    as_ids = complete(client, [tokenizer(text)["input_ids"] for text in texts])
    assert [choice.text for choice in as_ids.choices] == [choice.text for choice in together.choices]
    # one prompt refused refuses the request, naming it; the others' answers are let go of
    # (the first would decode to the end of the context, about a thousand tokens, seconds on this CPU, if kept)
    image = refused(lambda: complete(client, [PROMPT, "<image> what is this?"], max_tokens=1000, extra_body={"ignore_eos": True}))
    assert image.status_code == 400 and image.body["param"] == "prompt" and "image token" in image.body["message"]
    for _ in range(30):
        if engine.scheduler.active == 0:
            break
        time.sleep(0.05)
    assert engine.scheduler.active == 0
    assert complete(client, texts[:2]).choices[1].text == alone[1].choices[0].text  # and the server goes on
    # a prompt with no room for an answer refuses a stream of several too, before it begins (the model's context: 1024)
    full = refused(lambda: list(client.completions.create(model=MODEL, prompt=[[5] * 10, [5] * 1024], max_tokens=2, stream=True)))
    assert full.status_code == 400 and full.body["code"] == "context_length_exceeded" and full.body["param"] == "prompt"
    # streamed, the choices' chunks interleave, each naming its prompt; each one's text is its whole answer's
    chunks = list(client.completions.create(model=MODEL, prompt=texts, temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    texts_by_index = ["".join(chunk.choices[0].text for chunk in chunks if chunk.choices and chunk.choices[0].index == index)
                      for index in range(3)]
    assert texts_by_index == [choice.text for choice in together.choices]
    finishes = [(chunk.choices[0].index, chunk.choices[0].finish_reason) for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert sorted(finishes) == [(index, choice.finish_reason) for index, choice in enumerate(together.choices)]
    assert chunks[-1].usage.model_dump() == together.usage.model_dump() and all(chunk.usage is None for chunk in chunks[:-1])
