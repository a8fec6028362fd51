"""Checkpoints in, checkpoints out, with the weights untouched (the `llava-convert` command is trainer/convert_cli.py).

    llava-convert SRC DST                    llava-hf (LLaVA or LLaVA-NeXT) or original LLaVA  ->  llava_plugin
    llava-convert SRC DST --to llava-hf      llava_plugin  ->  llava-hf (transformers' LlavaForConditionalGeneration, or
                                             LlavaNextForConditionalGeneration for an AnyRes model)

SRC is a folder or a hub id; the format is read from its config. DST is written to a temporary folder and renamed
into place, so a failed conversion leaves nothing behind. Not shipped as remote code: nothing in the model imports it.
"""

import ast
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

from .components import load_hf_tower, prepare_tokenizer
from .configuration_llava_plugin import LlavaPluginConfig
from .image_processing_llava_plugin import LlavaPluginImageProcessor
from .modeling_llava_plugin import LlavaPluginForConditionalGeneration
from .processing_llava_plugin import LlavaPluginProcessor

FORMATS = ("llava-hf", "original", "llava_plugin")
# transformers' in-memory LLaVA names <-> ours (the order matters: longest prefixes first)
HF_TO_PLUGIN = (
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("model.vision_tower.", "vision_tower."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# LLaVA-NeXT adds one weight, the row-end embedding, at the top of its inner model.
HF_NEXT_TO_PLUGIN = (("model.image_newline", "image_newline"),) + HF_TO_PLUGIN
SELECT_FROM_HF = {"default": "patch", "full": "cls_patch"}
# The pixel settings an AnyRes processor takes over from llava-hf's, so an imported model sees the same tiles.
ANYRES_PIXEL_SETTINGS = ("size", "crop_size", "do_center_crop", "resample")


def rename(state: dict, table) -> dict:
    renamed = {}
    for key, value in state.items():
        for old, new in table:
            if key.startswith(old):
                renamed[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"no mapping for weight {key!r}")
    return renamed


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def local_folder(source: str) -> Path:
    """A checkpoint folder, or a hub id's snapshot; a path that is neither is named as such (the hub's own message
    for it is "Repo id must be in the form ...")."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.fullmatch(source):
        raise ValueError(f"{source}: no such folder (and not a hub id, which reads NAME or OWNER/NAME)")
    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]))


def detect_format(folder: Path) -> str:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json, so no checkpoint format to detect")
    config = json.loads(config_path.read_text())
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type == "llava_plugin":
        return "llava_plugin"
    if "mm_vision_tower" in config or model_type == "llava_llama" or "LlavaLlamaForCausalLM" in architectures:
        return "original"
    if model_type in ("llava", "llava_next") and "vision_config" in config and "text_config" in config:
        return "llava-hf"
    raise ValueError(
        f"{folder}: unknown checkpoint format (model_type {model_type!r}, architectures {architectures}); expected "
        "llava-hf (model_type 'llava' or 'llava_next' with vision_config and text_config), original LLaVA (LlavaLlamaForCausalLM with "
        "mm_vision_tower) or llava_plugin"
    )


def image_aspect_of(image_processor) -> str:
    if getattr(image_processor, "do_pad", False):
        return "pad"
    return "crop" if getattr(image_processor, "do_center_crop", False) else "resize"


def pixel_backend_of(image_processor) -> str:
    """The backend transformers loads this checkpoint's processor with (torchvision by default, where installed)."""
    return "pil" if type(image_processor).__name__.endswith("Pil") else "torchvision"


def plugin_processor(tokenizer, config: LlavaPluginConfig, mean, std, chat_template: str | None = None,
                     split_text_at_images: bool = False, **image_settings) -> LlavaPluginProcessor:
    image_processor = LlavaPluginImageProcessor(image_aspect=config.image_aspect, image_size=config.vision_config.image_size,
                                                image_mean=mean, image_std=std, image_grid_pinpoints=config.image_grid_pinpoints,
                                                **image_settings)
    return LlavaPluginProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length, chat_template=chat_template,
                                split_text_at_images=split_text_at_images)


def write_plugin(folder: Path, config: LlavaPluginConfig, state: dict, processor, generation_config: GenerationConfig | None):
    """Config (with auto_map), weights, processor, generation config and the remote code, without building a model."""
    config.architectures = ["LlavaPluginForConditionalGeneration"]
    config.save_pretrained(folder)
    save_torch_state_dict(state, folder)
    processor.save_pretrained(folder)
    generation = generation_config or GenerationConfig()
    generation.suppress_tokens = [config.image_token_id]
    generation.pad_token_id = processor.tokenizer.pad_token_id
    generation.save_pretrained(folder)
    package = Path(__file__).resolve().parent
    for name in ("configuration_llava_plugin.py", "modeling_llava_plugin.py", "processing_llava_plugin.py",
                 "image_processing_llava_plugin.py", "vision_tower.py", "components.py", "anyres.py"):
        shutil.copyfile(package / name, folder / name)


def from_llava_hf(source: Path, folder: Path):
    """llava-hf LLaVA or LLaVA-NeXT (AnyRes) -> ours; pixels as the checkpoint's processor makes them (its backend)."""
    next_model = json.loads((source / "config.json").read_text())["model_type"] == "llava_next"
    model = (LlavaNextForConditionalGeneration if next_model else LlavaForConditionalGeneration).from_pretrained(source, dtype="auto")
    hf_processor = AutoProcessor.from_pretrained(source)
    hf = model.config
    if not isinstance(hf.vision_feature_layer, int):
        raise ValueError(f"{source}: vision_feature_layer {hf.vision_feature_layer} (several layers) is not supported")
    if hf.projector_hidden_act != "gelu" or not hf.multimodal_projector_bias:
        raise ValueError(f"{source}: projector act {hf.projector_hidden_act!r}, bias {hf.multimodal_projector_bias}: only gelu with bias maps to mlp2x_gelu")
    image_processor = hf_processor.image_processor
    config = LlavaPluginConfig(
        vision_config=hf.vision_config, text_config=hf.text_config, projector_type="mlp2x_gelu",
        vision_feature_layer=hf.vision_feature_layer, vision_feature_select=SELECT_FROM_HF[hf.vision_feature_select_strategy],
        image_aspect=image_aspect_of(image_processor), image_token_id=hf.image_token_id, dtype=hf.dtype,
        image_grid_pinpoints=hf.image_grid_pinpoints if next_model else None,
    )
    tokenizer = prepare_tokenizer(hf_processor.tokenizer, "<image>", getattr(hf.text_config, "max_position_embeddings", None))
    settings = {"pixel_backend": pixel_backend_of(image_processor)}
    if next_model:  # LLaVA-NeXT's LLMs differ (Vicuna, Mistral, Yi): its own template, where it has one, asks as trained
        settings.update({key: _plain(getattr(image_processor, key)) for key in ANYRES_PIXEL_SETTINGS})
        settings["chat_template"] = hf_processor.chat_template
    processor = plugin_processor(tokenizer, config, image_processor.image_mean, image_processor.image_std, **settings)
    state = rename(model.state_dict(), HF_NEXT_TO_PLUGIN if next_model else HF_TO_PLUGIN)
    write_plugin(folder, config, state, processor, model.generation_config)


def _plain(value):
    """A processor setting as JSON writes it: SizeDicts as dicts, resampling enums as ints."""
    if hasattr(value, "height") or hasattr(value, "shortest_edge"):
        return {key: getattr(value, key) for key in ("height", "width", "shortest_edge") if getattr(value, key, None) is not None}
    return int(value) if hasattr(value, "value") else value


def read_original_weights(source: Path) -> dict:
    """Shards as .safetensors, or .bin read with weights_only=True (no code from the file runs)."""
    files = sorted(source.glob("*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{source}: no .safetensors or pytorch_model*.bin weights")
    state = {}
    for path in files:
        state.update(load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True))
    return state


def from_original(source: Path, folder: Path, vision_tower: str | None):
    raw = json.loads((source / "config.json").read_text())
    tower_name = vision_tower or raw["mm_vision_tower"]
    tower, vision_config, mean, std = load_hf_tower(tower_name, dtype=None)
    projector = raw.get("mm_projector_type", "linear")
    pinpoints = original_pinpoints(raw, source)
    text_config = LlamaConfig(**{key: value for key, value in raw.items()
                                 if not key.startswith(("mm_", "architectures", "model_type", "auto_map", "image_grid_pinpoints"))})
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer = prepare_tokenizer(tokenizer, "<image>", text_config.max_position_embeddings)
    state = {}
    for key, value in read_original_weights(source).items():
        if key.startswith("model.vision_tower."):
            continue  # the tower comes from mm_vision_tower (or --vision-tower)
        if key == "model.image_newline" and pinpoints is not None:  # v1.6 (spatial_unpad)
            state["image_newline"] = value
        elif key.startswith("model.mm_projector."):
            index = key[len("model.mm_projector."):]
            state["projector." + (index if index[0].isdigit() else "0." + index)] = value
        elif key.startswith("model."):
            state["language_model." + key] = value
        elif key.startswith("lm_head."):
            state["language_model." + key] = value
        else:
            raise ValueError(f"{source}: unexpected weight {key!r} in an original LLaVA checkpoint")
    grow_vocabulary(state, len(tokenizer))
    text_config.vocab_size = state["language_model.model.embed_tokens.weight"].shape[0]
    state.update({f"vision_tower.{key}": value for key, value in tower.state_dict().items()})
    config = LlavaPluginConfig(
        vision_config=vision_config, text_config=text_config, projector_type=projector,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2), vision_feature_select=raw.get("mm_vision_select_feature", "patch"),
        image_aspect="pad" if raw.get("image_aspect_ratio") == "pad" else "crop",
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
    )
    generation = GenerationConfig.from_pretrained(source) if (source / "generation_config.json").exists() else None
    # The original tokenized the text between images piece by piece: keep doing so, or a Llama-2 tokenizer saved
    # with `legacy: false` loses the "▁" the model saw after every image.
    write_plugin(folder, config, state, plugin_processor(tokenizer, config, mean, std, split_text_at_images=True), generation)


def original_pinpoints(raw: dict, source: Path) -> list[list[int]] | None:
    """The original v1.6 (LLaVA-NeXT) layout: `image_aspect_ratio` "anyres" with `mm_patch_merge_type`
    "spatial_unpad" and `image_grid_pinpoints` as (width, height) pairs, a list or its Python text; ours are
    (height, width). None for v1/v1.5 checkpoints. Its PIL resizing is what our default "pil" backend reproduces."""
    if raw.get("image_aspect_ratio") != "anyres":
        return None
    merge = raw.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise ValueError(f"{source}: anyres with mm_patch_merge_type {merge!r}; only 'spatial_unpad' (LLaVA-NeXT's) is supported")
    pinpoints = raw.get("image_grid_pinpoints")
    if isinstance(pinpoints, str):
        try:
            pinpoints = ast.literal_eval(pinpoints)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"{source}: image_grid_pinpoints {pinpoints!r} is not a list of (width, height) pairs") from error
    if not isinstance(pinpoints, (list, tuple)) or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in pinpoints):
        raise ValueError(f"{source}: image_grid_pinpoints {pinpoints!r} is not a list of (width, height) pairs")
    return [[int(height), int(width)] for width, height in pinpoints]


def grow_vocabulary(state: dict, size: int):
    """New token rows (the <image> marker) start as the mean of the existing rows; their features overwrite them."""
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        weight = state.get(key)
        if weight is not None and weight.shape[0] < size:
            extra = weight.mean(0, keepdim=True).expand(size - weight.shape[0], -1)
            state[key] = torch.cat([weight, extra.to(weight.dtype)])


def to_llava_hf(source: Path, folder: Path):
    model = LlavaPluginForConditionalGeneration.from_pretrained(source, dtype="auto")
    processor = AutoProcessor.from_pretrained(source)
    ours = model.config
    if ours.vision_config.model_type == "llava_plugin_open_clip":
        raise ValueError(f"{source}: an open_clip tower has no llava-hf equivalent (transformers loads CLIP/SigLIP towers)")
    if ours.projector_type != "mlp2x_gelu":
        raise ValueError(f"{source}: projector {ours.projector_type!r}; llava-hf's is a 2-layer GELU MLP (mlp2x_gelu) only")
    if ours.image_grid_pinpoints is not None:
        return to_llava_next_hf(model, processor, folder)
    config = LlavaConfig(**hf_config_fields(ours))
    config.architectures = ["LlavaForConditionalGeneration"]
    ip = processor.image_processor
    square = {"height": ip.image_size, "width": ip.image_size}
    image_processor = LlavaImageProcessor(
        do_pad=ours.image_aspect == "pad", do_center_crop=ours.image_aspect == "crop", crop_size=square,
        size={"shortest_edge": ip.image_size} if ours.image_aspect == "crop" else square,
        image_mean=list(ip.image_mean), image_std=list(ip.image_std),
    )
    write_hf(folder, model, config, LlavaProcessor, image_processor, processor, HF_TO_PLUGIN)


def write_hf(folder: Path, model, config, processor_class, image_processor, processor, table):
    """The llava-hf folder: config, renamed weights, transformers' own processor around our tokenizer and template."""
    ours = model.config
    hf_processor = processor_class(
        image_processor=image_processor, tokenizer=processor.tokenizer, patch_size=ours.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(ours.tower_has_cls), chat_template=processor.chat_template,
    )
    config.save_pretrained(folder)
    save_torch_state_dict(rename(model.state_dict(), [(new, old) for old, new in table]), folder)
    hf_processor.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def hf_config_fields(ours: LlavaPluginConfig) -> dict:
    return dict(
        vision_config=ours.vision_config.to_dict(), text_config=ours.text_config.to_dict(), image_token_index=ours.image_token_id,
        image_seq_length=ours.image_seq_length, vision_feature_layer=ours.vision_feature_layer,
        vision_feature_select_strategy={v: k for k, v in SELECT_FROM_HF.items()}[ours.vision_feature_select],
        tie_word_embeddings=bool(getattr(ours.text_config, "tie_word_embeddings", False)),
    )


def to_llava_next_hf(model: LlavaPluginForConditionalGeneration, processor, folder: Path):
    """An AnyRes model -> transformers' LlavaNextForConditionalGeneration with its own LLaVA-NeXT processor."""
    ours, ip = model.config, processor.image_processor
    config = LlavaNextConfig(**hf_config_fields(ours), image_grid_pinpoints=ours.image_grid_pinpoints)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=ours.image_grid_pinpoints, image_mean=list(ip.image_mean), image_std=list(ip.image_std),
        **{key: _plain(getattr(ip, key)) for key in ANYRES_PIXEL_SETTINGS},
    )
    write_hf(folder, model, config, LlavaNextProcessor, image_processor, processor, HF_NEXT_TO_PLUGIN)


def convert(source: str, destination: str, to: str = "llava_plugin", vision_tower: str | None = None) -> str:
    """Returns the detected source format. DST must not exist: it appears whole or not at all."""
    target = Path(destination)
    if target.exists():
        raise ValueError(f"{target} exists; choose a new destination")
    folder = local_folder(source)
    found = detect_format(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if to == "llava-hf":
            if found != "llava_plugin":
                raise ValueError(f"--to llava-hf converts llava_plugin checkpoints; {source} is {found}")
            to_llava_hf(folder, staging)
        elif found == "llava-hf":
            from_llava_hf(folder, staging)
        elif found == "original":
            from_original(folder, staging, vision_tower)
        else:
            raise ValueError(f"{source} is already a llava_plugin checkpoint (use --to llava-hf to export it)")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return found
