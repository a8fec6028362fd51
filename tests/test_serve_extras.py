"""vLLM's request extras through llava-serve, each implemented or refused by name, never silently ignored:
stop_token_ids, include_stop_str_in_output, skip_special_tokens and stop_reason; a conversation's rendering
(add_generation_prompt, continue_final_message, echo, chat_template_kwargs); a completion's add_special_tokens;
the /tokenize, /detokenize and /version routes. Over loopback with the official openai client."""

import httpx
import pytest
import torch

from engine.decoding import Sampling
from engine.penalties import Penalties, bad_word_ids
from engine.prompts import template_variables
from test_serve import CIRCLES, EXAMPLES, MODEL, ask, client, data_url, engine, question, refused  # noqa: F401
from test_serve_completions import PROMPT, complete


def greedy_tokens(engine, client, extra_body: dict | None = None, **options) -> list[int]:
    """The token ids of the greedy answer to CIRCLES (its text re-tokenized would not always give them back)."""
    answer = ask(client, CIRCLES, logprobs=True, extra_body={"return_tokens_as_token_ids": True, **(extra_body or {})}, **options)
    return [int(entry.token.removeprefix("token_id:")) for entry in answer.choices[0].logprobs.content]


def test_a_stop_token_id_ends_the_answer_where_the_model_draws_it(client, engine):
    tokenizer = engine.processor.tokenizer
    whole = ask(client, CIRCLES)
    tokens = greedy_tokens(engine, client)
    assert tokenizer.decode(tokens, skip_special_tokens=True).strip() == whole.choices[0].message.content
    at = 2  # the third token of the answer, which the greedy answer first draws there
    stop_token = tokens[at]
    assert stop_token not in tokens[:at]
    cut = ask(client, CIRCLES, extra_body={"stop_token_ids": [stop_token, 0]})
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop_token
    assert choice.message.content == tokenizer.decode(tokens[:at], skip_special_tokens=True).strip()
    assert cut.usage.completion_tokens == at + 1  # the stop token counts, as the end token does (vLLM's)
    kept = ask(client, CIRCLES, extra_body={"stop_token_ids": [stop_token], "include_stop_str_in_output": True}).choices[0]
    assert kept.message.content == tokenizer.decode(tokens[: at + 1], skip_special_tokens=True).strip()
    assert kept.model_extra["stop_reason"] == stop_token
    # streamed: the same text, and the last chunk says why
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=40, stream=True,
                                                 extra_body={"stop_token_ids": [stop_token]}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == choice.message.content
    assert chunks[-1].choices[0].model_extra["stop_reason"] == stop_token
    assert all(chunk.choices[0].model_extra["stop_reason"] is None for chunk in chunks[:-1])
    # an answer the model ends itself has no stop_reason
    assert whole.choices[0].model_extra["stop_reason"] is None


def test_stop_token_ids_wait_for_min_tokens_and_stop_also_with_ignore_eos(client, engine):
    tokens = greedy_tokens(engine, client)
    first = tokens[0]
    later = ask(client, CIRCLES, extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert later.usage.completion_tokens >= 3  # blocked as the first token, so the answer went another way
    # as vLLM's: min_tokens keeps the end token out of an answer's first tokens with ignore_eos too
    eos = engine.processor.tokenizer.eos_token_id
    through = ask(client, CIRCLES, max_tokens=len(tokens) + 4, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert eos in through.choices[0].model_extra["token_ids"][: len(tokens) + 1]
    held = ask(client, CIRCLES, max_tokens=len(tokens) + 4,
               extra_body={"ignore_eos": True, "min_tokens": len(tokens) + 2, "return_token_ids": True})
    assert eos not in held.choices[0].model_extra["token_ids"][: len(tokens) + 2]
    ignoring = ask(client, CIRCLES, max_tokens=30, extra_body={"stop_token_ids": [tokens[2]], "ignore_eos": True})
    assert ignoring.choices[0].finish_reason == "stop" and ignoring.usage.completion_tokens == 3
    assert ignoring.choices[0].model_extra["stop_reason"] == tokens[2]


def test_a_stop_string_kept_in_the_text_with_include_stop_str_in_output(client):
    full = ask(client, CIRCLES).choices[0].message.content  # "The circle is red."
    cut = ask(client, CIRCLES, stop=[" is", "zzz"]).choices[0]
    assert cut.message.content == full.split(" is")[0] and cut.model_extra["stop_reason"] == " is"
    kept = ask(client, CIRCLES, stop=[" is"], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.message.content == full.split(" is")[0] + " is" and kept.model_extra["stop_reason"] == " is"
    completion = complete(client, PROMPT, max_tokens=24)
    text = completion.choices[0].text
    word = text.split()[1]
    stopped = complete(client, PROMPT, max_tokens=24, stop=[word], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert stopped.text == text[: text.index(word) + len(word)] and stopped.model_extra["stop_reason"] == word


def test_skip_special_tokens_false_keeps_their_text(client, engine):
    tokenizer = engine.processor.tokenizer
    tokens = greedy_tokens(engine, client)
    # with ignore_eos the end token is a token of the answer; its text shows only without skip_special_tokens
    answers = {skip: ask(client, CIRCLES, max_tokens=len(tokens) + 2,
                         extra_body={"ignore_eos": True, "skip_special_tokens": skip}).choices[0].message.content
               for skip in (True, False)}
    assert tokenizer.eos_token not in answers[True] and tokenizer.eos_token in answers[False]
    assert answers[False].replace(tokenizer.eos_token, "").split() == answers[True].split()  # the same tokens, their text shown


def continued(messages: list[dict], text: str) -> list[dict]:
    return messages + [{"role": "assistant", "content": text}]


def test_continue_final_message_continues_the_assistants_text_as_a_completion_would(client, engine):
    prefix = "The circle"
    messages = continued(CIRCLES, prefix)
    answer = ask(client, messages, extra_body={"continue_final_message": True, "add_generation_prompt": False})
    rendered = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What color is the circle?"}, {"type": "image"}]},
         {"role": "assistant", "content": prefix}], add_generation_prompt=False, continue_final_message=True)
    assert rendered.endswith("ASSISTANT: The circle")
    continuation = answer.choices[0].message.content
    assert continuation.startswith(" ") and "red" in continuation  # raw: what follows "The circle", its space kept
    whole = ask(client, CIRCLES).choices[0].message.content
    assert prefix + continuation.rstrip() == whole  # the greedy answer, continued where it was cut
    echoed = ask(client, messages, extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True})
    assert echoed.choices[0].message.content == prefix + continuation
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40, stream=True,
                                            extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == prefix + continuation
    # the same through chat_template_kwargs, as vLLM also takes them
    kwargs = ask(client, messages, extra_body={"chat_template_kwargs": {"continue_final_message": True, "add_generation_prompt": False}})
    assert kwargs.choices[0].message.content == continuation


def test_add_generation_prompt_false_renders_no_opened_turn(client):
    # without an assistant turn opened, the model goes on after the question: another answer than the usual one
    opened = ask(client, CIRCLES, max_tokens=8)
    closed = ask(client, CIRCLES, max_tokens=8, extra_body={"add_generation_prompt": False})
    assert closed.usage.prompt_tokens < opened.usage.prompt_tokens  # " ASSISTANT:" left out
    assert closed.choices[0].message.content != opened.choices[0].message.content
    # echo echoes a last message of the assistant's only: after the user's, the answer is as without it
    assert ask(client, CIRCLES, max_tokens=8, extra_body={"echo": True}).choices[0].message.content == opened.choices[0].message.content


@pytest.mark.parametrize("extra, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt true by default
    ({"chat_template_kwargs": {"continue_final_message": True}}, "continue_final_message"),
    ({"chat_template_kwargs": {"continue_final_message": "yes", "add_generation_prompt": False}},
     "chat_template_kwargs.continue_final_message"),
    ({"echo": "yes"}, "echo"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(2000))}, "stop_token_ids"),
    ({"include_stop_str_in_output": "true"}, "include_stop_str_in_output"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": [-3]}, "allowed_token_ids.0"),
    ({"bad_words": ["x"] * 129}, "bad_words"),
    ({"bad_words": [""]}, "bad_words.0"),
    ({"cache_salt": "s" * 257}, "cache_salt"),
])
def test_bad_rendering_and_stop_fields_are_refused_by_name(client, extra, param):
    error = refused(lambda: ask(client, continued(CIRCLES, "The"), extra_body=extra))
    assert error.status_code == 400 and error.body["param"] == param, error.body


def test_continue_final_message_with_a_tool_call_is_refused(client):
    tool = {"type": "function", "function": {"name": "color", "parameters": {"type": "object", "properties": {}}}}
    error = refused(lambda: ask(client, continued(CIRCLES, "The"), tools=[tool], tool_choice="required",
                                extra_body={"continue_final_message": True, "add_generation_prompt": False}))
    assert error.status_code == 400 and error.body["param"] == "continue_final_message"


@pytest.mark.parametrize("extra, param", [
    ({"use_beam_search": True}, "use_beam_search"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"add_special_tokens": True}, "add_special_tokens"),
    ({"priority": 5}, "priority"),
    ({"logits_processors": ["my.module:Processor"]}, "logits_processors"),
])
def test_extras_not_implemented_are_refused_by_name(client, extra, param):
    error = refused(lambda: ask(client, CIRCLES, extra_body=extra))
    assert error.status_code == 400 and error.body["param"] == param and error.body["code"] == "unsupported_parameter", error.body


def test_extras_at_their_neutral_values_are_accepted(client):
    neutral = {"use_beam_search": False, "length_penalty": 1.0, "bad_words": [], "spaces_between_special_tokens": True,
               "logits_processors": [], "mm_processor_kwargs": {}, "return_token_ids": False, "vllm_xargs": {}, "priority": 0,
               "chat_template": None, "documents": None, "add_special_tokens": False, "skip_special_tokens": True,
               "include_stop_str_in_output": False, "stop_token_ids": [], "echo": False, "add_generation_prompt": True,
               "chat_template_kwargs": {"enable_thinking": False}}
    assert ask(client, CIRCLES, extra_body=neutral).choices[0].message.content == ask(client, CIRCLES).choices[0].message.content


def test_template_kwargs_reach_only_the_variables_a_template_reads(engine):
    """A key the template reads reaches it; one it does not read, or one the renderer sets itself (an eos_token a
    client would redefine), does not."""
    prompter = engine.prompter
    template = prompter.processor.chat_template
    assert template_variables(template) >= {"messages", "add_generation_prompt", "eos_token"}
    assert not template_variables(template) & {"parts", "turns"}  # set by the template itself
    arguments = prompter.template_arguments({"eos_token": "!", "messages": [], "enable_thinking": True, "continue_final_message": True,
                                             "add_generation_prompt": False})
    assert arguments == {"add_generation_prompt": False, "continue_final_message": True}
    reading = "{% for m in messages %}{{ m.content }}{% endfor %}{% if enable_thinking %}<think>{% endif %}"
    assert template_variables(reading) == {"messages", "enable_thinking"}
    assert template_variables("{% unknown_tag %}") == frozenset()


def test_a_completion_without_special_tokens_has_no_start_token(client, engine):
    tokenizer = engine.processor.tokenizer
    with_start = complete(client, PROMPT, max_tokens=4)
    without = complete(client, PROMPT, max_tokens=4, extra_body={"add_special_tokens": False})
    expected = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert without.usage.prompt_tokens == expected
    assert with_start.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    if tokenizer.bos_token_id is not None and tokenizer(PROMPT)["input_ids"][0] == tokenizer.bos_token_id:
        assert with_start.usage.prompt_tokens == expected + 1
    assert refused(lambda: complete(client, PROMPT, extra_body={"add_special_tokens": "no"})).body["param"] == "add_special_tokens"


def test_tokenize_counts_a_conversation_as_its_chat_request_does(client, engine):
    """vLLM's /tokenize: a conversation's tokens, images' included, are its chat request's prompt_tokens, rendered
    with the same fields; a text prompt's are the tokenizer's; /detokenize gives the text back."""
    base = str(client.base_url).removesuffix("/v1/")
    tokenizer = engine.processor.tokenizer
    counted = httpx.post(base + "/tokenize", json={"model": MODEL, "messages": CIRCLES}).json()
    assert counted["count"] == ask(client, CIRCLES, max_tokens=1).usage.prompt_tokens == len(counted["tokens"])
    assert counted["max_model_len"] == 1024 and counted["token_strs"] is None
    assert counted["tokens"].count(engine.processor.image_token_id) == engine.processor.image_seq_length
    messages = continued(CIRCLES, "The circle")
    rendering = {"add_generation_prompt": False, "continue_final_message": True}
    continuing = httpx.post(base + "/tokenize", json={"messages": messages, **rendering}).json()
    assert continuing["count"] == ask(client, messages, max_tokens=1, extra_body=rendering).usage.prompt_tokens
    text = httpx.post(base + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert text["tokens"] == tokenizer(PROMPT)["input_ids"] and text["count"] == complete(client, PROMPT, max_tokens=1).usage.prompt_tokens
    assert text["token_strs"] == tokenizer.convert_ids_to_tokens(text["tokens"])
    bare = httpx.post(base + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    back = httpx.post(base + "/detokenize", json={"model": MODEL, "tokens": bare["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(bare["tokens"])}
    assert httpx.get(base + "/version").json()["version"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "a", "messages": CIRCLES}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, 404, "model"),
    ("/tokenize", {"messages": CIRCLES, "add_special_tokens": True}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": CIRCLES, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"messages": CIRCLES, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    ("/tokenize", {"messages": question("Hi", "data:image/png;base64,AAAA")}, 400, "messages"),  # as a chat request says it
    ("/tokenize", {"messages": question("Hi", "http://127.0.0.1/a.png")}, 400, "messages.0.content"),  # no URLs allowed
    ("/tokenize", {"prompt": 7}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
])
def test_tokenize_and_detokenize_refuse_bad_input_by_name(client, path, body, status, param):
    base = str(client.base_url).removesuffix("/v1/")
    response = httpx.post(base + path, json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_a_cache_salt_shares_cached_prefixes_with_its_own_salt_only(client, engine):
    """vLLM's cache_salt: a tenant's requests reuse each other's cached prefixes and image features, and nothing of
    another tenant's or of unsalted requests, not even the system prompt (a timing would tell one tenant what
    another sent)."""
    url = data_url(EXAMPLES / "three_shapes.png")
    messages = question("Which tenant is asking about the triangle?", url)
    first = ask(client, messages, max_tokens=4, extra_body={"cache_salt": "tenant-a"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nothing before it had this salt
    again = ask(client, messages, max_tokens=4, extra_body={"cache_salt": "tenant-a"})
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    other = ask(client, messages, max_tokens=4, extra_body={"cache_salt": "tenant-b"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    plain = ask(client, messages, max_tokens=4)  # the system prompt of the module's other requests, no more
    assert plain.usage.prompt_tokens_details.cached_tokens < plain.usage.prompt_tokens // 2
    image_key = engine.prompter.decoded((EXAMPLES / "three_shapes.png").read_bytes())[1]
    assert engine.prefixes.has_features(image_key, "tenant-a") and not engine.prefixes.has_features(image_key, "tenant-z")
    # a scored prompt (prompt_logprobs, lm-eval's echo) reuses nothing, and what it stores stays under its salt
    scored = question("What does the scoring tenant see?", url)
    ask(client, scored, max_tokens=2, extra_body={"cache_salt": "tenant-d", "prompt_logprobs": 0})
    assert ask(client, scored, max_tokens=2).usage.prompt_tokens_details.cached_tokens < plain.usage.prompt_tokens // 2
    again = ask(client, scored, max_tokens=2, extra_body={"cache_salt": "tenant-d"})
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    text = "A prompt only one tenant scored. USER: Hi ASSISTANT:"
    complete(client, text, max_tokens=1, echo=True, logprobs=0, extra_body={"cache_salt": "tenant-e"})
    assert (complete(client, text, max_tokens=1).usage.prompt_tokens_details or {"cached_tokens": 0}).cached_tokens < 8
    salted = complete(client, PROMPT, max_tokens=2, extra_body={"cache_salt": "tenant-c"})
    assert salted.usage.prompt_tokens_details is None or salted.usage.prompt_tokens_details.cached_tokens == 0
    again = complete(client, PROMPT, max_tokens=2, extra_body={"cache_salt": "tenant-c"})
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_allowed_token_ids_are_the_only_tokens_drawn(client, engine):
    tokens = greedy_tokens(engine, client)
    allowed = sorted(set(tokens[1:]))  # the answer's first token is not among them
    answer = ask(client, CIRCLES, max_tokens=12, logprobs=True,
                 extra_body={"allowed_token_ids": allowed, "return_tokens_as_token_ids": True})
    drawn = [int(entry.token.removeprefix("token_id:")) for entry in answer.choices[0].logprobs.content]
    assert drawn and set(drawn) <= set(allowed) and drawn != tokens[: len(drawn)]
    # one token allowed, the end token not among them: that token to the limit
    only = ask(client, CIRCLES, max_tokens=5, temperature=1.0, seed=3, logprobs=True,
               extra_body={"allowed_token_ids": [tokens[0]], "return_tokens_as_token_ids": True})
    assert [entry.token for entry in only.choices[0].logprobs.content] == [f"token_id:{tokens[0]}"] * 5
    assert only.choices[0].finish_reason == "length"
    error = refused(lambda: ask(client, CIRCLES, extra_body={"allowed_token_ids": [tokens[0]], "bad_words": [
        engine.processor.tokenizer.decode([tokens[0]])]}))
    assert error.status_code == 400 and error.body["param"] == "allowed_token_ids"


def contains(tokens: list[int], word: tuple[int, ...]) -> bool:
    return any(tuple(tokens[at: at + len(word)]) == word for at in range(len(tokens) - len(word) + 1))


def test_bad_words_are_never_said(client, engine):
    tokenizer = engine.processor.tokenizer
    tokens = greedy_tokens(engine, client)
    natural = tokenizer.decode(tokens, skip_special_tokens=True)
    for word in ("red", tokenizer.decode(tokens[1:3]).strip()):  # one word, and two tokens of the answer
        banned = bad_word_ids(tokenizer, [word])
        assert any(contains(tokens, ids) for ids in banned), (word, banned)  # the greedy answer says it ...
        said = greedy_tokens(engine, client, extra_body={"bad_words": [word]})
        assert not any(contains(said, ids) for ids in banned), word  # ... and with it banned, never
        assert tokenizer.decode(said, skip_special_tokens=True) != natural


def test_a_bad_words_last_token_is_ruled_out_only_after_the_rest_of_it():
    rules = Penalties(Sampling(max_new_tokens=8, bad_words=((3, 4), (7,), (1, 2, 5))), [])
    scores = torch.zeros(10)
    rules.apply(scores)
    assert torch.isinf(scores).nonzero().flatten().tolist() == [7]
    for token, ruled_out in ((3, [4, 7]), (1, [7]), (2, [5, 7]), (9, [7])):
        rules.add(token)
        scores = torch.zeros(10)
        rules.apply(scores)
        assert torch.isinf(scores).nonzero().flatten().tolist() == ruled_out, token
    allowed = Penalties(Sampling(max_new_tokens=8, allowed_token_ids=(2, 5)), [])
    scores = torch.zeros(10)
    allowed.apply(scores)
    assert torch.isfinite(scores).nonzero().flatten().tolist() == [2, 5]


def test_return_token_ids_gives_the_prompts_and_the_answers_ids(client, engine):
    """vLLM's return_token_ids (what RL rollouts train on): the prompt's ids as the model read them (its /tokenize
    ids) and each choice's, the end token that finished it last, whole and streamed alike."""
    base = str(client.base_url).removesuffix("/v1/")
    tokenizer = engine.processor.tokenizer
    tokens = greedy_tokens(engine, client)
    whole = ask(client, CIRCLES, n=2, extra_body={"return_token_ids": True})
    prompt = httpx.post(base + "/tokenize", json={"messages": CIRCLES}).json()["tokens"]
    assert whole.model_extra["prompt_token_ids"] == prompt and len(prompt) == whole.usage.prompt_tokens
    for choice in whole.choices:
        ids = choice.model_extra["token_ids"]
        assert ids[:-1] == tokens and ids[-1] == tokenizer.eos_token_id  # ended by the end token, which is listed
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == choice.message.content
    assert whole.usage.completion_tokens == 2 * len(tokens) + 2
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=40, stream=True,
                                                 extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt
    assert [token for chunk in chunks for token in chunk.choices[0].model_extra["token_ids"]] == tokens + [tokenizer.eos_token_id]
    assert "prompt_token_ids" not in ask(client, CIRCLES).model_extra
    # a completion's: each choice has its prompt's
    completion = complete(client, [PROMPT, "USER: Hi ASSISTANT:"], max_tokens=3, extra_body={"return_token_ids": True})
    for choice, text in zip(completion.choices, [PROMPT, "USER: Hi ASSISTANT:"]):
        assert choice.model_extra["prompt_token_ids"] == tokenizer(text)["input_ids"]
        assert tokenizer.decode(choice.model_extra["token_ids"], skip_special_tokens=True) == choice.text
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                              extra_body={"return_token_ids": True}))
    assert streamed[0].choices[0].model_extra["prompt_token_ids"] == tokenizer(PROMPT)["input_ids"]
    alone = complete(client, PROMPT, max_tokens=5, extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
    assert [token for chunk in streamed for token in chunk.choices[0].model_extra["token_ids"]] == alone
    assert len(alone) == 5 and alone[:3] == completion.choices[0].model_extra["token_ids"]


def test_truncate_prompt_tokens_reads_only_the_prompts_last_tokens(client, engine):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (its start token the first to go), an image whole
    or the request refused by that field's name."""
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    cut = complete(client, PROMPT, max_tokens=6, extra_body={"truncate_prompt_tokens": 8, "return_token_ids": True})
    assert cut.usage.prompt_tokens == 8 and cut.choices[0].model_extra["prompt_token_ids"] == ids[-8:]
    assert cut.choices[0].text == complete(client, ids[-8:], max_tokens=6).choices[0].text
    assert complete(client, PROMPT, max_tokens=2, extra_body={"truncate_prompt_tokens": -1}).usage.prompt_tokens == len(ids)
    # a chat whose system prompt loses its first tokens: the image and the question stay
    whole = ask(client, CIRCLES, max_tokens=1).usage.prompt_tokens
    shorter = ask(client, CIRCLES, extra_body={"truncate_prompt_tokens": whole - 5, "return_token_ids": True})
    assert shorter.usage.prompt_tokens == whole - 5
    assert shorter.model_extra["prompt_token_ids"].count(engine.processor.image_token_id) == engine.processor.image_seq_length
    into_image = refused(lambda: ask(client, CIRCLES, extra_body={"truncate_prompt_tokens": 12}))
    assert into_image.status_code == 400 and into_image.body["param"] == "truncate_prompt_tokens"
    for bad in (0, -2, 10**6, "8"):
        error = refused(lambda: complete(client, PROMPT, extra_body={"truncate_prompt_tokens": bad}))
        assert error.status_code == 400 and error.body["param"] == "truncate_prompt_tokens", bad


def test_prompt_logprobs_in_vllms_layout_equal_the_models_own(client, engine):
    """vLLM's prompt_logprobs: per prompt token after the first, its log-probability and rank and its most likely
    alternatives', by token id; the numbers those of one forward of the model over the prompt."""
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = engine.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)
    completion = complete(client, PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2})
    layout = completion.choices[0].model_extra["prompt_logprobs"]
    assert len(layout) == len(ids) and layout[0] is None
    for position, (token, entry) in enumerate(zip(ids[1:], layout[1:]), start=1):
        row = expected[position - 1]
        assert list(entry)[0] == str(token)
        assert entry[str(token)]["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[str(token)]["rank"] == int((row >= row[token]).sum())  # vLLM's: the token and those at least as likely
        best = row.topk(2).indices.tolist()
        assert {key for key, value in entry.items() if value["rank"] <= 2} == {str(alternative) for alternative in best}
        assert 2 <= len(entry) <= 3
    assert layout[1][str(ids[1])]["decoded_token"] == tokenizer.decode(ids[1:2])
    # a chat's: the response's, its prompt's length (images' tokens included), in the stream's first chunk too
    chat = ask(client, CIRCLES, max_tokens=2, extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    prompt = chat.model_extra["prompt_token_ids"]
    assert len(chat.model_extra["prompt_logprobs"]) == len(prompt) == chat.usage.prompt_tokens
    assert all(list(entry) == [str(token)] for token, entry in zip(prompt[1:], chat.model_extra["prompt_logprobs"][1:]))
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=2, stream=True,
                                                 extra_body={"prompt_logprobs": 0}))
    assert chunks[0].model_extra["prompt_logprobs"] == chat.model_extra["prompt_logprobs"]
    # with echo's log-probabilities another count is refused
    error = refused(lambda: complete(client, PROMPT, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}))
    assert error.status_code == 400 and error.body["param"] == "prompt_logprobs"
    assert complete(client, PROMPT, max_tokens=1, echo=True, logprobs=1, extra_body={"prompt_logprobs": 1}).choices[0].logprobs


@pytest.mark.parametrize("extra", [
    {"allowed_token_ids": "image"},  # a token the model never generates
    {"allowed_token_ids": "eos", "min_tokens": 3},  # only the end token, which min_tokens holds back
    {"allowed_token_ids": "first", "bad_words": "first"},  # only a bad word
])
def test_token_rules_that_leave_no_token_are_a_400(client, engine, extra):
    tokenizer = engine.processor.tokenizer
    first = greedy_tokens(engine, client)[0]
    named = {"image": engine.processor.image_token_id, "eos": tokenizer.eos_token_id, "first": first}
    body = {key: [named[value]] if key == "allowed_token_ids" else [tokenizer.decode([named[value]])] if key == "bad_words" else value
            for key, value in extra.items()}
    for stream in (False, True):
        error = refused(lambda: list(client.chat.completions.create(model=MODEL, messages=CIRCLES, max_tokens=8, stream=stream,
                                                                    extra_body=body)) if stream else ask(client, CIRCLES, extra_body=body))
        assert error.status_code == 400 and error.body["param"] == "allowed_token_ids", (extra, error.body)
    assert ask(client, CIRCLES).choices[0].message.content  # the engine answers on


def test_truncation_keeps_the_start_token_a_tokenizer_added_and_echoes_what_was_read(client, engine):
    from engine.prompts import TruncationRefused
    prompter, bos, image = engine.prompter, engine.processor.tokenizer.bos_token_id, engine.processor.image_token_id
    ids = torch.tensor([[bos, 5, 6, 7, 8]])
    assert prompter.kept(ids, 3).tolist() == [[bos, 7, 8]]  # as vLLM truncates on the left: special tokens stay
    assert prompter.kept(ids, 3, keep_start=False).tolist() == [[6, 7, 8]]  # token ids sent: the last ones only
    assert prompter.kept(ids, 9).tolist() == ids.tolist()
    with pytest.raises(TruncationRefused):
        prompter.kept(torch.tensor([[bos, 5, image, image, 8]]), 2)
    echoed = complete(client, PROMPT, max_tokens=1, echo=True, logprobs=0, extra_body={"truncate_prompt_tokens": 6})
    kept = engine.processor.tokenizer(PROMPT)["input_ids"][-6:]
    text = echoed.choices[0].text
    assert text.startswith(engine.processor.tokenizer.decode(kept, skip_special_tokens=True)) and not text.startswith(PROMPT[:10])
    assert echoed.choices[0].logprobs.text_offset[:6] == sorted(echoed.choices[0].logprobs.text_offset[:6])


def test_echo_after_a_user_message_without_an_opened_turn_answers_in_the_users_role(client):
    """vLLM's: without add_generation_prompt the answer continues the last message's turn, whatever its role."""
    messages = [{"role": "user", "content": "What is a circle? It is"}]
    rendering = {"add_generation_prompt": False, "continue_final_message": True}
    plain = ask(client, messages, max_tokens=6, extra_body=rendering)
    echoed = ask(client, messages, max_tokens=6, extra_body={**rendering, "echo": True})
    assert plain.choices[0].message.role == echoed.choices[0].message.role == "user"
    assert echoed.choices[0].message.content == "What is a circle? It is" + plain.choices[0].message.content


def test_chat_template_kwargs_reach_a_template_that_reads_them(engine):
    import copy
    from engine.prompts import Prompter
    processor = copy.copy(engine.processor)
    processor.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if enable_thinking %}<think>{% endif %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    prompter = Prompter(processor)
    messages = [{"role": "user", "content": "Hi"}]
    assert prompter.prompt(messages, None, {"enable_thinking": True}).text == "Hi<think> ASSISTANT:"
    assert prompter.prompt(messages, None, {"enable_thinking": False, "eos_token": "!"}).text == "Hi ASSISTANT:"
    assert prompter.prompt(messages, None, {"messages": [{"role": "user", "content": "other"}]}).text == "Hi ASSISTANT:"


def test_a_chat_streams_its_prompts_facts_once_for_all_its_choices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=6, stream=True, n=2,
                                                 extra_body={"return_token_ids": True}))
    assert sum("prompt_token_ids" in chunk.model_extra for chunk in chunks) == 1
    whole = ask(client, CIRCLES, max_tokens=6, n=2, extra_body={"return_token_ids": True})
    for index in range(2):
        ids = [token for chunk in chunks for choice in chunk.choices if choice.index == index for token in choice.model_extra["token_ids"]]
        assert ids == whole.choices[index].model_extra["token_ids"] and ids


def test_stop_token_ids_that_leave_no_token_before_min_tokens_are_a_400(client, engine):
    everything = list(range(engine.scheduler.vocabulary))
    for path, body in (("chat", {"messages": [{"role": "user", "content": "hi"}]}), ("completions", {"prompt": PROMPT})):
        call = (lambda: client.chat.completions.create(model=MODEL, max_tokens=5, extra_body={"stop_token_ids": everything[:1024],
                "min_tokens": 1}, **body)) if path == "chat" else (lambda: client.completions.create(
                model=MODEL, max_tokens=5, extra_body={"stop_token_ids": everything[:1024], "min_tokens": 1}, **body))
        assert engine.scheduler.vocabulary <= 1024
        error = refused(call)
        assert error.status_code == 400 and error.body["param"] == "stop_token_ids", error.body
    # without min_tokens they end the answer at once, as its end token would
    ended = ask(client, CIRCLES, extra_body={"stop_token_ids": everything[:1024]})
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].message.content == ""


def test_echo_with_a_forced_tool_call_is_refused_and_a_continued_message_cut_before_its_image_is_explained(client):
    tool = {"type": "function", "function": {"name": "color", "parameters": {"type": "object", "properties": {}}}}
    error = refused(lambda: ask(client, continued(CIRCLES, "The"), tools=[tool], tool_choice="required", extra_body={"echo": True}))
    assert error.status_code == 400 and error.body["param"] == "echo"
    assert ask(client, continued(CIRCLES, "The"), tools=[tool], tool_choice="auto", extra_body={"echo": True}).choices[0]
    cut = refused(lambda: ask(client, CIRCLES, extra_body={"continue_final_message": True, "add_generation_prompt": False}))
    assert cut.status_code == 400 and "continue_final_message" in cut.body["message"]
