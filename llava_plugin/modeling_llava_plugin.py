"""The model: vision tower -> projector W -> features scattered into the language model's embeddings at the image
tokens -> language model. This file ships as remote code (torch, transformers and siblings only)."""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache

from . import anyres
from .configuration_llava_plugin import LlavaPluginConfig
from .vision_tower import build_vision_tower, tower_hidden_state


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
        # Only W is ours to initialize: the towers initialize (or load) themselves.
        if isinstance(module, LlavaPluginProjector):
            std = getattr(self.config.text_config, "initializer_range", None) or 0.02
            for layer in module:
                if isinstance(layer, nn.Linear):
                    init.normal_(layer.weight, mean=0.0, std=std)
                    init.zeros_(layer.bias)
        if getattr(module, "image_newline", None) is not None:  # AnyRes: as llava_next draws it
            init.normal_(module.image_newline, mean=0.0, std=self.config.text_config.hidden_size ** -0.5)


class LlavaPluginForConditionalGeneration(LlavaPluginPreTrainedModel, GenerationMixin):
    """`vision_tower` and `language_model` may be passed already built (from_components loads pretrained ones);
    otherwise they are built from the config, as `from_pretrained` does before loading the weights."""

    def __init__(self, config: LlavaPluginConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None):
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        self.projector = LlavaPluginProjector(config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_depth)
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
        """(num_images, 3, H, W) -> the tower's selected hidden states (num_images, image_seq_length, vision hidden):
        what W consumes. The tower is frozen in both stages, so these can be computed once and cached.
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

    def get_image_features(self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                           image_sizes=None) -> torch.Tensor:
        """Pixels (or precomputed vision features) -> (num_images, image_seq_length, text hidden size).
        AnyRes: -> (all images' tokens, text hidden size), each image's tiles packed by anyres.pack_all."""
        if vision_features is None:
            vision_features = self.get_vision_features(pixel_values, image_sizes)
        features = self.projector(vision_features.to(self.projector[0].weight.dtype))
        if self.config.image_grid_pinpoints is None:
            return features
        pinpoints, tile_size = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return anyres.pack_all(features, image_sizes, self.image_newline, pinpoints, tile_size)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Writes the features, in order, over the embeddings of the image tokens."""
        image_mask = input_ids == self.config.image_token_id
        n_tokens, n_features = int(image_mask.sum()), image_features.shape[:-1].numel()
        if n_tokens != n_features:
            layout = f"{image_features.shape[0]} images x {image_features.shape[1]}" if image_features.dim() == 3 else "AnyRes, packed"
            raise ValueError(f"Image features and image tokens do not match: tokens: {n_tokens}, features: {n_features} ({layout})")
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        """As transformers does for pixel_values: cached vision features feed the prefill only."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("vision_features", None)
        return inputs

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
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ):
        """Labels follow transformers: -100 is ignored, the shift happens inside the language model's loss.
        `vision_features` (the tower's cached output, see get_vision_features) may stand in for pixel_values.
        `image_sizes` ((num_images, 2) original height, width) is needed by AnyRes models only."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
            if pixel_values is not None or vision_features is not None:
                image_features = self.get_image_features(pixel_values, vision_features, image_sizes)  # (N, S, D): prefill only
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif (cache is None or cache.get_seq_length() == 0) and bool((input_ids == self.config.image_token_id).any()):
                n_tokens = int((input_ids == self.config.image_token_id).sum())
                raise ValueError(f"Image features and image tokens do not match: tokens: {n_tokens}, features: 0 (no pixel_values)")
        elif pixel_values is not None or vision_features is not None:
            raise ValueError("pixel_values need input_ids to find the image tokens; pass input_ids instead of inputs_embeds")
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
