"""The model: vision tower -> projector W -> features scattered into the language model's embeddings at the image
tokens -> language model. This file ships as remote code (torch, transformers and siblings only)."""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg

from . import anyres
from .configuration_llava_plugin import LlavaPluginConfig
from .vision_tower import OpenClipVisionTower, build_vision_tower, tower_hidden_state

# transformers renamed `past_key_values` to `cache` and accepts the old name until this version: so do we.
PAST_KEY_VALUES_UNTIL = "5.40.0"


def holds_no_tokens(cache: Cache | None) -> bool:
    """Whether a forward over this cache sees the prompt from its start. A static cache counts its tokens on the
    device, and reading that would sync every decode step: generate only ever prefills one as its first iteration."""
    return cache is None or (not cache.is_compileable and cache.get_seq_length() == 0)


def mark_initialized(module: nn.Module):
    """A component passed in already built (pretrained) is not ours to initialize: post_init skips flagged modules."""
    for submodule in module.modules():
        submodule._is_hf_initialized = True


class LlavaPluginProjector(nn.Sequential):
    """W: Linear (the paper's 'linear'), or N Linears with GELU between them ('mlpNx_gelu', LLaVA-1.5).
    A Sequential so its keys read `projector.0`, `projector.2` as the original `mm_projector` does."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, depth: int):
        layers = [nn.Linear(vision_hidden_size, text_hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size)]
        super().__init__(*layers)


class LlavaPluginPreTrainedModel(PreTrainedModel):
    config: LlavaPluginConfig
    config_class = LlavaPluginConfig
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        """transformers calls this on each module holding weights the checkpoint lacked (each of W's Linears, not W),
        skipping the towers that are PreTrainedModels: they initialize themselves. Linears, embeddings and norms
        follow transformers' rule (std: the text config's initializer_range); an open_clip tower's bare parameters
        follow open_clip's."""
        super()._init_weights(module)
        tower = getattr(self, "vision_tower", None)
        if isinstance(tower, OpenClipVisionTower) and module is tower.visual:
            tower.init_bare_parameters()
        if getattr(module, "image_newline", None) is not None:  # AnyRes: as llava_next draws it
            init.normal_(module.image_newline, mean=0.0, std=self.config.text_config.hidden_size ** -0.5)

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        """transformers' walk (children first, each sub-model's modules by its own `_init_weights`) without the
        shortcut it takes for custom code, which skips any module whose direct parameters are all loaded: that skips
        every container, so a tower's rule for one (CLIP scales its attention projections) would never run. Every
        rule here goes through transformers' init functions, which leave loaded weights alone by themselves."""

        def walk(module: nn.Module, initialize):
            for child in module.children():
                walk(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialize)
            initialize(module, is_custom_code=False)

        walk(self, self._initialize_weights)


class LlavaPluginForConditionalGeneration(LlavaPluginPreTrainedModel, GenerationMixin):
    """`vision_tower` and `language_model` may be passed already built (from_components loads pretrained ones);
    otherwise they are built from the config, as `from_pretrained` does before loading the weights."""

    def __init__(self, config: LlavaPluginConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None):
        super().__init__(config)
        for part in (vision_tower, language_model):
            if part is not None:
                mark_initialized(part)
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        vision_width = config.vision_config.hidden_size * len(config.feature_layers)  # several layers: side by side
        self.projector = LlavaPluginProjector(vision_width, config.text_config.hidden_size, config.projector_depth)
        self.language_model = language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        # AnyRes only: the embedding that ends each row of an image's tile grid (see anyres.py).
        anyres_model = config.image_grid_pinpoints is not None
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size)) if anyres_model else None
        self.post_init()
        # The towers' lists name classes of models they belong to (CLIP's names its text embeddings): keep the ones
        # present, since FSDP's wrapping policy refuses a class it cannot find.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    @classmethod
    def from_components(cls, vision: str, llm: str, projector: str = "mlp2x_gelu", **kwargs):
        """(model, processor) from a pretrained vision tower and language model; see `components.assemble`."""
        from .components import assemble

        return assemble(cls, vision=vision, llm=llm, projector=projector, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)

    def get_vision_features(self, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """(num_images, 3, H, W) -> the tower's selected hidden states (num_images, image_seq_length, vision hidden x
        feature layers): what W consumes. The tower is frozen in both stages, so these can be computed once and cached.
        AnyRes: tiles in, one row per tile out; llava-hf's padded (images, max_tiles, 3, H, W) needs image_sizes."""
        size = self.config.vision_config.image_size
        if self.config.image_grid_pinpoints is not None and pixel_values.dim() == 5:
            pixel_values = anyres.split_tiles(pixel_values, image_sizes, self.config.image_grid_pinpoints, size)
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} but the tower takes {size}px squares: use the processor")
        tower_dtype = next(self.vision_tower.parameters()).dtype
        hidden = tower_hidden_state(self.vision_tower, pixel_values.to(tower_dtype), self.config.vision_feature_layer)
        prefix = int(self.config.tower_has_cls)
        if hidden.shape[1] != self.config.num_patches + prefix:  # a tower with extra tokens (registers) we do not know
            raise ValueError(f"the vision tower returned {hidden.shape[1]} tokens, expected {self.config.num_patches + prefix}")
        if prefix and self.config.vision_feature_select == "patch":
            hidden = hidden[:, 1:]  # drop CLS
        return hidden

    def get_image_features(self, pixel_values: torch.Tensor, return_dict: bool = True, image_sizes=None
                           ) -> BaseModelOutputWithPooling | tuple:
        """(num_images, 3, H, W) -> as transformers' vision-language models return it: `pooler_output` the image
        tokens' embeddings (num_images, image_seq_length, text hidden size; AnyRes: (all images' tokens, text hidden
        size), each image's tiles packed by anyres.pack_all), `last_hidden_state` the tower's selected hidden states W
        consumed. `generate` calls this once, before the prefill (`mm_encoder_outputs`)."""
        vision_features = self.get_vision_features(pixel_values, image_sizes)
        out = BaseModelOutputWithPooling(last_hidden_state=vision_features,
                                         pooler_output=self.project_vision_features(vision_features, image_sizes))
        return out if return_dict else out.to_tuple()

    def project_vision_features(self, vision_features: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """W: the tower's selected hidden states (see get_vision_features) -> (num_images, image_seq_length, text
        hidden); AnyRes models pack each image's tiles with its row ends (image_sizes needed)."""
        features = self.projector(vision_features.to(self.projector[0].weight.dtype))
        if self.config.image_grid_pinpoints is None:
            return features
        pinpoints, tile_size = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return anyres.pack_all(features, image_sizes, self.image_newline, pinpoints, tile_size)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features) -> torch.Tensor:
        """Writes the features, in order, over the embeddings of the image tokens. `image_features`: (num_images,
        image_seq_length, D), (tokens, D), or a list of either (as generate slices and expands them)."""
        pieces = image_features if isinstance(image_features, (list, tuple)) else [image_features]
        features = torch.cat([piece.reshape(-1, piece.shape[-1]) for piece in pieces])  # (tokens, D)
        image_mask = input_ids == self.config.image_token_id
        n_tokens = image_mask.sum()
        # A compile-friendly check (a hint under torch.compile, a ValueError in eager mode), as transformers' LLaVA.
        torch_compilable_check(
            n_tokens == features.shape[0],
            lambda: f"Image features and image tokens do not match: tokens: {int(n_tokens)}, features: {features.shape[0]}",
        )
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def select_image_features(self, pixel_values, vision_features, mm_encoder_outputs, inputs_embeds=None, image_sizes=None):
        """The image tokens' embeddings from whichever image input was given, or None for a text-only forward."""
        encoded = (mm_encoder_outputs or {}).get("image")
        given = [name for name, value in (("pixel_values", pixel_values), ("vision_features", vision_features),
                                          ("mm_encoder_outputs", encoded)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass one image input, got {' and '.join(given)}")
        if given and inputs_embeds is not None:
            raise ValueError(f"{given[0]} need input_ids to find the image tokens; pass input_ids instead of inputs_embeds")
        if encoded is not None:
            return encoded.pooler_output
        if pixel_values is not None:
            return self.get_image_features(pixel_values, image_sizes=image_sizes).pooler_output
        if vision_features is not None:
            return self.project_vision_features(vision_features, image_sizes)
        return None

    def check_image_tokens_have_features(self, input_ids: torch.Tensor, cache: Cache | None):
        """Image tokens in a prompt without an image: eager mode only, since it reads the tokens' values (a compiled
        decode step never holds image tokens: generate suppresses them)."""
        if torch.compiler.is_compiling() or not holds_no_tokens(cache):
            return
        n_tokens = int((input_ids == self.config.image_token_id).sum())
        if n_tokens:
            raise ValueError(f"Image features and image tokens do not match: tokens: {n_tokens}, features: 0 (no pixel_values)")

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_UNTIL, new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """transformers' own, with the image inputs kept wherever the cache does not hold the prompt yet: an
        assistant's first draft runs the whole prompt, image tokens included, though generate does not call it a
        first iteration. Cached vision features, like pixel values, feed the prefill only."""
        prefill = bool(is_first_iteration) or holds_no_tokens(cache)
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=prefill, **kwargs,
        )
        if not prefill and kwargs.get("use_cache", True):
            inputs.pop("vision_features", None)
        return inputs

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_UNTIL, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_features: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ):
        """Labels follow transformers: -100 is ignored, the shift happens inside the language model's loss.
        One image input at most: `pixel_values`, `vision_features` (the tower's cached output, see
        get_vision_features) or `mm_encoder_outputs` (get_image_features' output under "image", as generate passes it).
        `image_sizes` ((num_images, 2) original height, width) is needed by AnyRes models only."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image_features = self.select_image_features(pixel_values, vision_features, mm_encoder_outputs, inputs_embeds, image_sizes)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
            if image_features is not None:  # the prefill
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            else:
                self.check_image_tokens_have_features(input_ids, cache)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


LlavaPluginForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["LlavaPluginForConditionalGeneration", "LlavaPluginPreTrainedModel", "LlavaPluginProjector"]
