"""Assembly of a new model from pretrained parts: a vision tower, a causal LM and its tokenizer.

Vision specs: any transformers vision tower or full CLIP/SigLIP checkpoint (hub id or local folder), or
"open_clip:NAME[:PRETRAINED]" where NAME is an open_clip model name, "hf-hub:org/repo" or "local-dir:/path".
"""

import copy
import logging

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging as hf_logging

from .configuration_llava_plugin import LlavaPluginConfig, OpenClipVisionConfig
from .image_processing_llava_plugin import LlavaPluginImageProcessor
from .processing_llava_plugin import DEFAULT_SYSTEM, LlavaPluginProcessor, llava_v1_chat_template
from .vision_tower import OpenClipVisionTower

logger = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def parse_open_clip_spec(spec: str) -> tuple[str, str | None]:
    """'open_clip:ViT-L-14-336:openai' -> ('ViT-L-14-336', 'openai'); schema names keep their own colons."""
    body = spec[len(OPEN_CLIP_PREFIX):]
    if not body:
        raise ValueError(f"empty open_clip model in vision spec {spec!r}; expected open_clip:NAME[:PRETRAINED]")
    if body.startswith(OPEN_CLIP_SCHEMAS):
        return body, None  # the schema's folder or repo carries its weights
    name, _, tag = body.partition(":")
    return name, tag or None


def load_open_clip_tower(spec: str, dtype: torch.dtype | None):
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"vision spec {spec!r} needs open_clip: pip install open_clip_torch") from error
    name, pretrained = parse_open_clip_spec(spec)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {name!r} in {spec!r}; known models: {', '.join(open_clip.list_models())}")
    clip = open_clip.create_model(name, pretrained=pretrained)
    visual = clip.visual
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    config = OpenClipVisionConfig(
        model_name=name,
        pretrained=pretrained,
        embed_dim=model_cfg["embed_dim"],
        vision_cfg=model_cfg["vision_cfg"],
        # OpenAI weights are loaded with QuickGELU whatever the JSON says: read it off the built modules.
        quick_gelu=any(isinstance(module, open_clip.transformer.QuickGELU) for module in visual.modules()),
        image_mean=list(preprocess.get("mean", OPENAI_CLIP_MEAN)),
        image_std=list(preprocess.get("std", OPENAI_CLIP_STD)),
    )
    tower = OpenClipVisionTower(config, visual=visual)
    return tower.to(dtype) if dtype is not None else tower, config, config.image_mean, config.image_std


def load_hf_tower(name_or_path: str, dtype: torch.dtype | None, **hub_kwargs):
    config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
    vision_config = getattr(config, "vision_config", None) or config  # full CLIP/SigLIP checkpoints: keep the image half
    # A full CLIP/SigLIP checkpoint holds a text half we do not want: its keys are expected to be unused, so the
    # loading report is silenced and checked here instead, for what matters (missing or mismatched image weights).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tower, info = AutoModel.from_pretrained(name_or_path, config=vision_config, dtype=dtype, output_loading_info=True, **hub_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"vision tower {name_or_path}: weights missing {sorted(info['missing_keys'])[:5]} "
            f"or mismatched {[key for key, *_ in info['mismatched_keys']][:5]}"
        )
    try:
        tower_processor = AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
        mean, std = tower_processor.image_mean, tower_processor.image_std
    except (OSError, ValueError):
        logger.warning("no image processor found with %s; normalizing with CLIP's mean and std", name_or_path)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return tower, vision_config, list(mean), list(std)


def prepare_tokenizer(tokenizer, image_token: str, context_length: int | None):
    """Adds the image token (and a pad token where missing) and caps model_max_length at the LM's context."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # LLaVA pads with <unk>
    if context_length is not None:
        tokenizer.model_max_length = min(tokenizer.model_max_length, context_length)
    return tokenizer


def assemble(
    model_class,
    vision: str,
    llm: str,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select: str = "patch",
    image_aspect: str = "pad",
    image_token: str = "<image>",
    dtype: torch.dtype | None = None,
    system_prompt: str | None = None,
    image_after_text: bool = False,
    image_grid_pinpoints: list | None = None,
    **hub_kwargs,
):
    """Loads both towers, adds the image token, builds W fresh; returns (model, processor). `system_prompt` replaces
    LLaVA v1's default system prompt in the processor's chat template; `image_after_text` makes that template render
    each turn's image after its text (`llava_v1_chat_template`). `image_grid_pinpoints` makes it an AnyRes
    (LLaVA-NeXT) model, [[height, width], ...] in multiples of the tower's size, with a fresh `image_newline`."""
    if vision.startswith(OPEN_CLIP_PREFIX):
        tower, vision_config, mean, std = load_open_clip_tower(vision, dtype)
    else:
        tower, vision_config, mean, std = load_hf_tower(vision, dtype, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(llm, **hub_kwargs)
    language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, **hub_kwargs)
    prepare_tokenizer(tokenizer, image_token, getattr(language_model.config, "max_position_embeddings", None))
    if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    attention = {
        "vision_config": getattr(vision_config, "_attn_implementation", None),
        "text_config": language_model.config._attn_implementation,
    }
    config = LlavaPluginConfig(
        vision_config=vision_config,
        text_config=language_model.config,
        projector_type=projector,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select=vision_feature_select,
        image_aspect=image_aspect,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        dtype=dtype,
        image_grid_pinpoints=image_grid_pinpoints,
    )
    config._attn_implementation = attention  # the composite's init resets its parts' choice: restore what each loaded with
    model = model_class(config, vision_tower=tower, language_model=language_model)
    if dtype is not None:
        model.projector.to(dtype)
    model.generation_config = copy.deepcopy(language_model.generation_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The image token is an input marker, never an output.
    model.generation_config.suppress_tokens = [config.image_token_id]
    image_processor = LlavaPluginImageProcessor(
        image_aspect=image_aspect, image_size=vision_config.image_size, image_mean=mean, image_std=std,
        image_grid_pinpoints=image_grid_pinpoints,
    )
    template = None
    if system_prompt is not None or image_after_text:
        template = llava_v1_chat_template(DEFAULT_SYSTEM if system_prompt is None else system_prompt, image_after_text)
    processor = LlavaPluginProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length, image_token=image_token,
                                     chat_template=template)
    return model, processor
