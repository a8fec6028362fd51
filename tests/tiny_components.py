"""Tiny, real components built and saved locally, so tests load them through the same code paths as hub models."""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

IMAGE_SIZE = 32
PATCH_SIZE = 8  # 16 patches per image
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A red circle on a white background.",
    "There are two shapes: a blue square at the top left and a green triangle in the center.",
    "How many shapes are in the image? Where is the yellow circle? Is there a red square?",
    "Describe the image concisely. Describe the image in detail. The answer is yes. The answer is no.",
]


def save_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences, with LLaMA's special tokens."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def llava_hf_parts(folder: Path, clip: str, max_position_embeddings: int = 256):
    """For a tiny llava-hf checkpoint in `folder`: its tokenizer (saved, with <image> and a pad token) and the
    vision and text config dicts (the tiny CLIP's image half, a 2-layer LLaMA)."""
    from transformers import CLIPVisionConfig

    tokenizer = save_tokenizer(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.unk_token
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_position_embeddings)
    return tokenizer, CLIPVisionConfig.from_pretrained(clip).to_dict(), text.to_dict()


def save_llava_hf(folder: Path, clip: str) -> Path:
    """A tiny llava-hf checkpoint: CLIP tower, LLaMA, <image> in the vocabulary, pad-to-square preprocessing."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

    tokenizer, vision, text = llava_hf_parts(folder, clip)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = LlavaImageProcessorPil(do_pad=True, size=square, do_center_crop=False, crop_size=square)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(folder)
    return folder


def save_llava_next_hf(folder: Path, clip: str, pinpoints: list, chat_template: str | None = None) -> Path:
    """A tiny llava-hf LLaVA-NeXT checkpoint: CLIP tower, LLaMA, grid pinpoints of the tower's 32px tiles."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer, vision, text = llava_hf_parts(folder, clip, max_position_embeddings=512)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()  # well away from zero, so a misplaced newline would show in the logits
    model.save_pretrained(folder)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=chat_template).save_pretrained(folder)
    return folder


def save_original_llava(folder: Path, seed: int, max_position_embeddings: int = 256, extra_weights: dict | None = None,
                        **config) -> dict:
    """An original LLaVA layout (LlavaLlamaForCausalLM, mm_* keys, .bin weights, no tower inside, CLIP-24 features
    into a 32-wide LLaMA); `config` adds or overrides keys. Returns the saved weights."""
    tokenizer = save_tokenizer(folder)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    state = dict(LlamaForCausalLM(text).state_dict())
    state.update({"model.mm_projector.0.weight": torch.randn(32, 24) * 0.1, "model.mm_projector.0.bias": torch.randn(32) * 0.1,
                  "model.mm_projector.2.weight": torch.randn(32, 32) * 0.1, "model.mm_projector.2.bias": torch.randn(32) * 0.1,
                  **(extra_weights or {})})
    torch.save(state, folder / "pytorch_model.bin")
    settings = {**text.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 24, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
                "mm_use_im_start_end": False, **config}
    (folder / "config.json").write_text(json.dumps(settings))
    return state


def original_as_llava_hf(state: dict, tower_state: dict) -> dict:
    """The published llava-hf key mapping of original LLaVA weights, the vocabulary grown by one row (<image>) with
    the mean of the others, as llava-convert does."""
    mapped = {f"model.vision_tower.{key}": value for key, value in tower_state.items()}
    for index, linear in (("0", "linear_1"), ("2", "linear_2")):
        for kind in ("weight", "bias"):
            mapped[f"model.multi_modal_projector.{linear}.{kind}"] = state[f"model.mm_projector.{index}.{kind}"]
    mapped.update({"model.language_model." + key[len("model."):]: value for key, value in state.items()
                   if key.startswith("model.") and not key.startswith(("model.mm_projector", "model.image_newline"))})
    for key, target in (("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")):
        mapped[target] = torch.cat([state[key], state[key].mean(0, keepdim=True)])
    if "model.image_newline" in state:
        mapped["model.image_newline"] = state["model.image_newline"]
    return mapped


def save_llm(folder: Path, seed: int = 0) -> Path:
    tokenizer = save_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def save_clip(folder: Path, seed: int = 0) -> Path:
    """A full CLIP checkpoint (text and image halves), as openai/clip-vit-* ship, with its image processor."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=24, intermediate_size=48,
            num_hidden_layers=3, num_attention_heads=4,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def save_siglip(folder: Path, seed: int = 0) -> Path:
    """A SigLIP vision tower alone (no CLS token), saved without an image processor."""
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    SiglipVisionModel(config).save_pretrained(folder)
    return folder


def save_open_clip(folder: Path, seed: int = 0) -> Path:
    """An open_clip model in its own local-dir layout (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 32, "head_width": 16, "patch_size": PATCH_SIZE},
        "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 16, "heads": 2, "layers": 1},
    }
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def user_turn(text: str, image_first: bool = True) -> dict:
    """A user message holding one image and a question, the image before or after the text."""
    parts = [{"type": "image"}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts if image_first else parts[::-1]}


COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}


def save_tiny_world(folder: Path, images: int = 24) -> Path:
    """Solid-colour images of varied sizes, with caption pairs (stage 1) and two-turn conversations (stage 2)."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions, conversations = [], []
    for index in range(images):
        colour = list(COLOURS)[index % len(COLOURS)]
        Image.new("RGB", (40 + 3 * index, 30 + index % 7), COLOURS[colour]).save(folder / "images" / f"{index}.png")
        captions.append({"id": f"cap{index}", "image": f"{index}.png", "caption": f"A {colour} picture."})
        conversations.append({"id": f"conv{index}", "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "What color is the picture?"}, {"from": "gpt", "value": f"It is {colour}."},
            {"from": "human", "value": "Is it a picture?"}, {"from": "gpt", "value": "Yes" + ", it is" * (index % 4) + "."}]})
    conversations.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]})
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "instruct.json").write_text(json.dumps(conversations))
    return folder
