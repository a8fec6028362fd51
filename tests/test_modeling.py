import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, CLIPVisionModel

from llava_plugin import LlavaPluginForConditionalGeneration
from tiny_components import user_turn

IMAGE = Image.new("RGB", (40, 30), (200, 30, 30))


def prompt_inputs(processor, question="What is in the picture?", image=IMAGE):
    prompt = processor.apply_chat_template([user_turn(question)], add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def test_from_components_keeps_the_pretrained_weights(assembled, parts):
    model, _ = assembled
    source_lm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    source_tower = CLIPVisionModel.from_pretrained(parts["clip"])
    lm_state = model.language_model.state_dict()
    for key, value in source_lm.state_dict().items():
        if "embed_tokens" in key or "lm_head" in key:  # grown by one row for <image>
            value, lm_state[key] = value, lm_state[key][: value.shape[0]]
        assert torch.equal(lm_state[key], value), key
    for key, value in source_tower.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[key], value), key


def test_forward_shapes_and_answer_only_loss(assembled):
    model, processor = assembled
    conversation = [user_turn("What is in the picture?"), {"role": "assistant", "content": "A red circle."}]
    conversation[0]["content"][0]["image"] = IMAGE
    batch = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["assistant_masks"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], labels=labels)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    # The loss is the mean next-token loss over the answer tokens only.
    shift_logits, shift_labels = out.logits[0, :-1], labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(shift_logits[shift_labels != -100], shift_labels[shift_labels != -100])
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_image_features_land_on_the_image_tokens(assembled):
    model, processor = assembled
    inputs = prompt_inputs(processor)
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert features.shape == (1, processor.image_seq_length, model.config.text_config.hidden_size)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    merged = model.merge_image_features(inputs["input_ids"], embeds, features)
    image_positions = inputs["input_ids"][0] == model.config.image_token_id
    assert torch.equal(merged[0, image_positions], features[0])
    assert torch.equal(merged[0, ~image_positions], embeds[0, ~image_positions])


def test_different_images_change_the_answer_logits(assembled):
    model, processor = assembled
    with torch.no_grad():
        red = model(**prompt_inputs(processor)).logits[0, -1]
        other = model(**prompt_inputs(processor, image=Image.effect_noise((40, 30), 80).convert("RGB"))).logits[0, -1]
    assert not torch.allclose(red, other)


def test_token_feature_mismatch_names_both_counts(assembled):
    model, processor = assembled
    inputs = prompt_inputs(processor)
    first_image_token = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    short = torch.cat([inputs["input_ids"][:, :first_image_token], inputs["input_ids"][:, first_image_token + 1:]], dim=1)
    assert int((short == model.config.image_token_id).sum()) == processor.image_seq_length - 1
    with pytest.raises(ValueError, match=rf"tokens: {processor.image_seq_length - 1}, features: {processor.image_seq_length}"):
        model(input_ids=short, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=rf"tokens: {processor.image_seq_length}, features: 0"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize("tower", ["clip", "open_clip"])
def test_wrong_image_size_is_a_clear_error(parts, tower):
    model, _ = LlavaPluginForConditionalGeneration.from_components(vision=parts[tower], llm=parts["llm"], projector="linear")
    with pytest.raises(ValueError, match=r"\(48, 48\) but the tower takes 32px"):
        model.get_image_features(torch.zeros(1, 3, 48, 48))


def test_greedy_generation_is_the_same_with_and_without_cache(assembled):
    model, processor = assembled
    inputs = prompt_inputs(processor)
    with_cache = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=True)
    without_cache = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape[1] == inputs["input_ids"].shape[1] + 12
    assert torch.equal(with_cache, without_cache)


def test_the_vision_tower_runs_once_per_generation(assembled):
    model, processor = assembled
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(**prompt_inputs(processor), max_new_tokens=10, do_sample=False)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_the_image_token_is_never_generated(assembled):
    model, processor = assembled
    inputs = prompt_inputs(processor)
    image_token = model.config.image_token_id
    lm_head = model.language_model.lm_head
    bias = torch.zeros(lm_head.out_features)
    bias[image_token] = 1e4  # make the image token the model's favourite output
    lm_head.bias = torch.nn.Parameter(bias)
    try:
        new_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        unsuppressed = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[])[0, inputs["input_ids"].shape[1]:]
    finally:
        lm_head.bias = None
    assert image_token in unsuppressed.tolist()  # the bias works...
    assert image_token not in new_tokens.tolist()  # ...and the default generation config still refuses it


def test_batched_generation_with_left_padding_matches_single(assembled):
    model, processor = assembled
    questions = ["What is in the picture?", "How many shapes are in the image? Where is the yellow circle?"]
    prompts = [processor.apply_chat_template([user_turn(q)], add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(images=[IMAGE, IMAGE], text=prompts, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "right"
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    for row, question in enumerate(questions):
        single_inputs = prompt_inputs(processor, question)
        single = model.generate(**single_inputs, max_new_tokens=6, do_sample=False)[:, single_inputs["input_ids"].shape[1]:]
        assert torch.equal(batched[row], single[0])


# SigLIP has no CLS token to keep: cls_patch is refused for it (see test_config).
@pytest.mark.parametrize(
    "tower, select", [("clip", "patch"), ("clip", "cls_patch"), ("siglip", "patch"), ("open_clip", "patch"), ("open_clip", "cls_patch")]
)
def test_each_tower_kind_feeds_the_projector(parts, tower, select):
    model, processor = LlavaPluginForConditionalGeneration.from_components(
        vision=parts[tower], llm=parts["llm"], projector="linear", vision_feature_select=select
    )
    expected = 16 + (select == "cls_patch")
    assert processor.image_seq_length == model.config.image_seq_length == expected
    out = model(**prompt_inputs(processor))
    assert torch.isfinite(out.logits).all()


def test_feature_layer_selects_the_hidden_state_transformers_would(parts):
    model, processor = LlavaPluginForConditionalGeneration.from_components(
        vision=parts["clip"], llm=parts["llm"], projector="linear", vision_feature_layer=-2
    )
    pixel_values = prompt_inputs(processor)["pixel_values"]
    reference = CLIPVisionModel.from_pretrained(parts["clip"])(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    with torch.no_grad():
        assert torch.allclose(model.get_image_features(pixel_values).pooler_output, model.projector(reference), atol=1e-6)


@pytest.mark.parametrize("layer, blocks", [(-2, 2), (0, 0)])
def test_open_clip_layer_matches_open_clip_own_forward(parts, layer, blocks):
    import open_clip

    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["open_clip"], llm=parts["llm"], projector="linear",
                                                                           vision_feature_layer=layer)
    assert model.config.vision_config.model_name.startswith("local-dir:")
    pixel_values = prompt_inputs(processor)["pixel_values"]
    reference = open_clip.create_model(parts["open_clip"][len("open_clip:"):]).visual
    # Layer -2 of a 3-block tower is the output of block 2, layer 0 the embeddings after the pre-norm (as transformers
    # indexes hidden states): run the blocks by hand.
    x = reference.ln_pre(torch.cat([reference.class_embedding.expand(len(pixel_values), 1, -1), reference.conv1(pixel_values).flatten(2).transpose(1, 2)], 1)
                         + reference.positional_embedding)
    for block in reference.transformer.resblocks[:blocks]:
        x = block(x)
    with torch.no_grad():
        assert torch.allclose(model.get_image_features(pixel_values).pooler_output, model.projector(x[:, 1:]), atol=1e-5)
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]  # open_clip's own preprocessing config


@pytest.mark.parametrize("projector, linears", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_shapes(parts, projector, linears):
    model, _ = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"], projector=projector)
    layers = [layer for layer in model.projector if isinstance(layer, torch.nn.Linear)]
    assert len(layers) == linears
    assert layers[0].in_features == 24 and layers[-1].out_features == 32


def test_bfloat16_assembly_runs(parts):
    model, processor = LlavaPluginForConditionalGeneration.from_components(
        vision=parts["clip"], llm=parts["llm"], dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(**prompt_inputs(processor)).logits.dtype == torch.bfloat16


def test_gradient_checkpointing_trains_projector_and_language_model(parts):
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=parts["clip"], llm=parts["llm"])
    model.vision_tower.requires_grad_(False)  # stage 2: the tower stays frozen
    model.activation_checkpointing_enable()
    model.train()
    inputs = prompt_inputs(processor)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is not None for p in model.language_model.model.layers.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())


@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
def test_aspect_mode_travels_from_components_to_the_saved_processor(parts, aspect, tmp_path):
    from transformers import AutoProcessor

    model, processor = LlavaPluginForConditionalGeneration.from_components(
        vision=parts["clip"], llm=parts["llm"], projector="linear", image_aspect=aspect
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.image_aspect == loaded.image_processor.image_aspect == aspect
    wide = Image.new("RGB", (90, 20), (0, 0, 255))
    assert torch.equal(loaded(images=wide, text="<image>", return_tensors="pt")["pixel_values"],
                       processor(images=wide, text="<image>", return_tensors="pt")["pixel_values"])
