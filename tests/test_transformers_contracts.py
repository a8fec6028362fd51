"""The contracts transformers' own model tests (ModelTesterMixin, GenerationTesterMixin) hold every model to, checked
on a tiny CLIP + LLaMA model as transformers checks its LLaVA: weights missing from a checkpoint are initialized,
`past_key_values` still names the cache, the decode step compiles as one graph, assisted decoding and
`inputs_embeds` prompts give plain greedy decoding's answer."""

import copy
import json
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CompileConfig, DynamicCache, LlamaForCausalLM
from transformers.testing_utils import CaptureLogger
from transformers import modeling_utils

from llava_plugin import LlavaPluginForConditionalGeneration
from tiny_components import user_turn

RED, BLUE = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (36, 36), (20, 40, 220))


def prompt_inputs(processor, image=RED, question="What is in the picture?"):
    prompt = processor.apply_chat_template([user_turn(question)], add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, **kwargs)


def load(folder, **kwargs):
    model, info = LlavaPluginForConditionalGeneration.from_pretrained(folder, output_loading_info=True, **kwargs)
    return model.eval(), info


def checkpoint_without(folder, destination, prefix):
    """A copy of a saved checkpoint whose weights under `prefix` are gone."""
    destination.mkdir()
    for path in folder.iterdir():
        if path.suffix != ".safetensors":
            destination.joinpath(path.name).write_bytes(path.read_bytes())
    state = load_file(folder / "model.safetensors")
    save_file({key: value for key, value in state.items() if not key.startswith(prefix)}, destination / "model.safetensors",
              metadata={"format": "pt"})
    return destination


# 1. Missing weights

def test_a_linear_checkpoint_loaded_as_mlp2x_gelu_gets_an_initialized_second_layer_and_says_so(parts, tmp_path):
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"], projector="linear")
    model.save_pretrained(tmp_path / "linear")
    with CaptureLogger(modeling_utils.logger) as report:
        grown, info = load(tmp_path / "linear", projector_type="mlp2x_gelu")
    assert info["missing_keys"] == {"projector.2.weight", "projector.2.bias"}
    assert "projector.2.weight" in report.out and "MISSING" in report.out
    second = grown.projector[2]
    std = model.config.text_config.initializer_range
    assert torch.isfinite(second.weight).all() and abs(second.weight.std().item() - std) < 0.25 * std
    assert torch.equal(second.bias, torch.zeros_like(second.bias))
    assert torch.equal(grown.projector[0].weight, model.projector[0].weight)  # what the checkpoint had is kept
    with torch.no_grad():
        assert torch.isfinite(grown(**prompt_inputs(processor)).logits).all()
    # and the other way round: the extra layer is reported, not silently dropped
    grown.save_pretrained(tmp_path / "mlp")
    with CaptureLogger(modeling_utils.logger) as report:
        _, info = load(tmp_path / "mlp", projector_type="linear")
    assert info["unexpected_keys"] == {"projector.2.weight", "projector.2.bias"} and "UNEXPECTED" in report.out


@pytest.mark.parametrize("tower", ["clip", "open_clip"])
@pytest.mark.parametrize("part", ["projector.", "vision_tower.", "language_model."])
def test_any_missing_part_is_initialized_as_a_model_built_from_its_config(parts, tower, part, tmp_path):
    """transformers' check that loading without some weights gives what construction from the config gives: here
    the same distribution (mean and spread of each tensor), since the random draws differ."""
    model, _ = LlavaPluginForConditionalGeneration.from_components(vision=parts[tower], llm=parts["llm"], projector="mlp2x_gelu")
    model.save_pretrained(tmp_path / "full")
    loaded, info = load(checkpoint_without(tmp_path / "full", tmp_path / "partial", part))
    assert info["missing_keys"] and all(key.startswith(part) for key in info["missing_keys"])
    torch.manual_seed(0)
    built = LlavaPluginForConditionalGeneration(model.config).eval()
    for key in info["missing_keys"] - {"language_model.lm_head.weight"}:  # tied keys are filled by tying
        value, reference = loaded.get_parameter(key).float(), built.get_parameter(key).float()
        assert torch.isfinite(value).all(), key
        spread = 4 * reference.std() / value.numel() ** 0.5 + 1e-6  # 4 standard errors of each statistic
        assert abs(value.mean() - reference.mean()) <= 1.5 * spread, key
        assert abs(value.std() - reference.std()) <= spread, key


def test_pretrained_parts_passed_in_are_not_reinitialized(parts):
    """post_init initializes what is missing: a pretrained open_clip tower (no transformers flags) is not."""
    import open_clip

    from llava_plugin.components import parse_open_clip_spec

    name, _ = parse_open_clip_spec(parts["open_clip"])
    reference = open_clip.create_model(name).visual.state_dict()
    model, _ = LlavaPluginForConditionalGeneration.from_components(vision=parts["open_clip"], llm=parts["llm"])
    for key, value in reference.items():
        assert torch.equal(model.vision_tower.visual.state_dict()[key], value), key


# 2. The cache's old name

def test_past_key_values_is_still_the_cache_with_a_deprecation_warning(assembled):
    model, processor = assembled
    ids = prompt_inputs(processor)["input_ids"][:, :24]
    ids = ids.masked_fill(ids == model.config.image_token_id, 5)  # text only: the split below cuts no image
    with torch.no_grad():
        full = model(input_ids=ids).logits
        head = model(input_ids=ids[:, :20], cache=DynamicCache(config=model.config.text_config))
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache` instead"):
            tail = model(input_ids=ids[:, 20:], past_key_values=head.cache)
    assert tail.cache.get_seq_length() == 24
    torch.testing.assert_close(tail.logits, full[:, 20:], atol=1e-5, rtol=1e-5)
    with pytest.warns(FutureWarning):
        inputs = model.prepare_inputs_for_generation(ids, past_key_values=head.cache, use_cache=True)
    assert inputs["cache"] is head.cache


# 3. Full-graph compilation of the decode step

def test_generate_compiles_the_decode_step_as_one_graph_without_recompiling(saved_checkpoint, assembled):
    """As transformers' compile test: static cache, CompileConfig(fullgraph=True), two prompts of one shape; the
    answers equal eager decoding's and the second prompt reuses the first one's graph."""
    _, processor = assembled
    model, _ = load(saved_checkpoint)
    prompts = [prompt_inputs(processor, RED), prompt_inputs(processor, BLUE)]  # one shape: the image token count is fixed
    with torch.compiler.set_stance("force_eager"):
        eager = [greedy(model, inputs) for inputs in prompts]
    assert not hasattr(model, "_compiled_call")
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")  # the backend does not matter to the graph
    config._compile_all_devices = True  # compile on the CPU too
    torch.compiler.reset()
    try:
        compiled = [greedy(model, prompts[0], cache_implementation="static", compile_config=config)]
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled.append(greedy(model, prompts[1], cache_implementation="static", compile_config=config))
    finally:
        torch.compiler.reset()
    assert hasattr(model, "_compiled_call")
    for expected, got in zip(eager, compiled):
        assert torch.equal(expected, got)


# 4. Assisted (speculative) decoding with an image prompt

def test_assisted_decoding_with_itself_as_assistant_drafts_with_the_image_and_matches_greedy(saved_checkpoint, assembled):
    _, processor = assembled
    model, _ = load(saved_checkpoint)
    assistant, _ = load(saved_checkpoint)
    inputs = prompt_inputs(processor)
    first_draft = []
    hook = assistant.register_forward_pre_hook(lambda _, args, kwargs: first_draft.append(kwargs) if not first_draft else None,
                                               with_kwargs=True)
    try:
        assisted = greedy(model, inputs, assistant_model=assistant)
    finally:
        hook.remove()
    assert torch.equal(assisted, greedy(model, inputs))
    assert first_draft[0]["mm_encoder_outputs"]["image"] is not None  # the assistant saw the image, not bare image tokens


def test_a_plain_llama_assistant_drafts_for_an_image_prompt_and_greedy_is_unchanged(saved_checkpoint, assembled):
    _, processor = assembled
    model, _ = load(saved_checkpoint)
    assistant = copy.deepcopy(model.language_model)  # the LLaMA alone: same vocabulary, no eyes
    assert type(assistant) is LlamaForCausalLM
    drafts = []
    hook = assistant.register_forward_hook(lambda *args: drafts.append(1))
    try:
        for image in (RED, BLUE):
            inputs = prompt_inputs(processor, image)
            assert torch.equal(greedy(model, inputs, assistant_model=assistant), greedy(model, inputs))
    finally:
        hook.remove()
    assert drafts


# 5. inputs_embeds prompts

def test_generate_from_inputs_embeds_of_a_text_prompt_matches_input_ids(assembled):
    model, processor = assembled
    prompt = processor.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    batch = processor.tokenizer([prompt, "USER: How many shapes are in the image? ASSISTANT:"], padding=True,
                                padding_side="left", return_tensors="pt")
    from_ids = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=8,
                                 min_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, batch["input_ids"].shape[1]:])  # embeds in: only new tokens out
    with pytest.raises(ValueError, match="need input_ids to find the image tokens"):
        inputs = prompt_inputs(processor)
        model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), pixel_values=inputs["pixel_values"])


# The image encoder's output, as transformers' vision-language models give it

def test_get_image_features_returns_transformers_output_class(assembled):
    model, processor = assembled
    pixel_values = prompt_inputs(processor)["pixel_values"]
    out = model.get_image_features(pixel_values=pixel_values)
    assert type(out).__name__ == "BaseModelOutputWithPooling"
    assert out.pooler_output.shape == (1, processor.image_seq_length, model.config.text_config.hidden_size)
    assert torch.equal(out.last_hidden_state, model.get_vision_features(pixel_values))
    assert torch.equal(out.pooler_output, model.project_vision_features(out.last_hidden_state))
    assert torch.equal(model.get_image_features(pixel_values, return_dict=False)[1], out.pooler_output)
    with pytest.raises(ValueError, match="pass one image input, got pixel_values and vision_features"):
        model(**prompt_inputs(processor), vision_features=out.last_hidden_state)


# 6. transformers serve

def test_transformers_serve_cannot_load_a_remote_code_vlm_but_serves_the_llava_hf_export(saved_checkpoint, tmp_path):
    """What the serving docs claim: `transformers serve` resolves config.architectures[0] as a transformers class
    and tells a VLM from an LLM by the loaded class's name in transformers' own tables, so no custom-code class
    passes; the llava-hf export (`llava-convert --to llava-hf`) is transformers' own LLaVA and is served."""
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import BaseHandler

    from llava_plugin.convert import convert

    manager = ModelManager(device="cpu", dtype="auto", trust_remote_code=True)
    with pytest.raises(AttributeError, match="LlavaPluginForConditionalGeneration"):
        manager._load_model(str(saved_checkpoint))
    model, _ = load(saved_checkpoint)
    with pytest.raises(ValueError, match="Unknown modality"):
        manager.get_model_modality(model)
    export = str(tmp_path / "hf")
    convert(str(saved_checkpoint), export, to="llava-hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    served, processor = manager.load_model_and_processor(export)
    assert manager.get_model_modality(served, processor=processor).value in ("VLM", "MULTIMODAL")  # takes images
    RED.save(tmp_path / "red.png")
    messages = BaseHandler.get_processor_inputs_from_messages(  # an OpenAI request, as the server parses it
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "red.png")}},
                                      {"type": "text", "text": "What is in the picture?"}]}], manager.get_model_modality(served))
    assert messages[0]["content"][0]["type"] == "image"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert (inputs["input_ids"] == served.config.image_token_id).sum() == served.config.image_seq_length
    assert served.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 4
    manager.shutdown()


# vision_feature_layer as a list of layers

def test_several_feature_layers_feed_w_side_by_side_as_in_transformers_llava(parts, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from llava_plugin.convert import convert

    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"],
                                                                           vision_feature_layer=[-3, -1])
    assert model.projector[0].in_features == 2 * model.config.vision_config.hidden_size
    model.save_pretrained(tmp_path / "ours")
    processor.save_pretrained(tmp_path / "ours")
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), to="llava-hf")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load(tmp_path / "ours")
    assert ours.config.vision_feature_layer == theirs.config.vision_feature_layer == [-3, -1]
    inputs = prompt_inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)
    both, _ = LlavaPluginForConditionalGeneration.from_components(vision=parts["open_clip"], llm=parts["llm"], vision_feature_layer=[0, -1])
    pixel_values = prompt_inputs(processor)["pixel_values"]
    with torch.no_grad():
        side_by_side = both.get_vision_features(pixel_values)
        for index, layer in enumerate((0, -1)):
            both.config.vision_feature_layer = layer
            width = both.config.vision_config.hidden_size
            torch.testing.assert_close(side_by_side[..., index * width:(index + 1) * width], both.get_vision_features(pixel_values))
    with pytest.raises(ValueError, match="vision_feature_layer 7 is out of range for a tower with 3 layers"):
        type(model.config)(vision_config=model.config.vision_config, text_config=model.config.text_config, vision_feature_layer=[-2, 7])
