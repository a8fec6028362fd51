"""Configuration of a llava_plugin model: a vision tower, a projector W and a causal language model.

This file ships next to the weights as remote code: it imports only torch, transformers and the standard library.
"""

import re

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .anyres import check_pinpoints

PROJECTOR_PATTERN = re.compile(r"^(linear|mlp(\d+)x_gelu)$")
FEATURE_SELECTS = ("patch", "cls_patch")
IMAGE_ASPECTS = ("pad", "resize", "crop")
# HF vision towers whose sequence has no CLS token in front of the patches (all others we accept have one).
TOWERS_WITHOUT_CLS = ("siglip_vision_model", "siglip2_vision_model")
# Written into every saved config.json so the checkpoint loads with trust_remote_code through any of these.
AUTO_MAP = {
    "AutoConfig": "configuration_llava_plugin.LlavaPluginConfig",
    "AutoModel": "modeling_llava_plugin.LlavaPluginForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_llava_plugin.LlavaPluginForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_llava_plugin.LlavaPluginForConditionalGeneration",
}


class OpenClipVisionConfig(PreTrainedConfig):
    """An open_clip vision tower described inline, so rebuilding it needs neither the hub nor open_clip's registry.

    `vision_cfg` and `embed_dim` are open_clip's own `model_cfg` fields; `model_name` and `pretrained` record where
    the weights came from.
    """

    model_type = "llava_plugin_open_clip"

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = None
    embed_dim: int = 768
    vision_cfg: dict | None = None
    quick_gelu: bool = False
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_cfg is None:  # open_clip's ViT-L-14-336, the tower of LLaVA-1.5
            self.vision_cfg = {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14}
        for key in ("image_size", "patch_size", "width", "layers"):
            if key not in self.vision_cfg:
                raise ValueError(f"open_clip vision_cfg has no {key!r}: only ViT towers are supported, got {self.vision_cfg}")

    @property
    def hidden_size(self) -> int:
        return self.vision_cfg["width"]

    @property
    def image_size(self) -> int:
        size = self.vision_cfg["image_size"]
        return size if isinstance(size, int) else size[0]

    @property
    def patch_size(self) -> int:
        patch = self.vision_cfg["patch_size"]
        return patch if isinstance(patch, int) else patch[0]

    @property
    def num_hidden_layers(self) -> int:
        return self.vision_cfg["layers"]


class LlavaPluginConfig(PreTrainedConfig):
    """Everything needed to rebuild the model offline.

    vision_feature_layer indexes the tower's hidden states as transformers does: 0 is the embedding output, -1 the
    last layer, -2 (LLaVA's choice) the one before it; a list of layers feeds W their hidden states side by side, as
    transformers' LLaVA concatenates them. The image sequence length is derived, never stored.
    """

    model_type = "llava_plugin"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select: str = "patch"
    image_aspect: str = "pad"
    image_token_id: int | None = None
    # LLaVA-NeXT AnyRes: [[height, width], ...] canvases an image may be tiled at (see anyres.py); None: one tile.
    image_grid_pinpoints: list | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type") == OpenClipVisionConfig.model_type:
            self.vision_config = OpenClipVisionConfig(**self.vision_config)
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        if not PROJECTOR_PATTERN.match(self.projector_type):
            raise ValueError(f"projector_type must be 'linear' or 'mlpNx_gelu' (e.g. 'mlp2x_gelu'), got {self.projector_type!r}")
        if self.vision_feature_select not in FEATURE_SELECTS:
            raise ValueError(f"vision_feature_select must be one of {FEATURE_SELECTS}, got {self.vision_feature_select!r}")
        if self.image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {self.image_aspect!r}")
        if self.vision_feature_select == "cls_patch" and not self.tower_has_cls:
            raise ValueError(f"vision_feature_select='cls_patch' needs a tower with a CLS token; {self.vision_config.model_type} has none")
        layers = self.vision_config.num_hidden_layers
        chosen = self.feature_layers
        if not chosen or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in chosen):
            raise ValueError(f"vision_feature_layer must be a layer index or a non-empty list of them, got {self.vision_feature_layer!r}")
        for layer in chosen:
            if not -(layers + 1) <= layer <= layers:
                raise ValueError(f"vision_feature_layer {layer} is out of range for a tower with {layers} layers")
        if self.image_grid_pinpoints is not None:
            self._check_anyres()

    def _check_anyres(self):
        self.image_grid_pinpoints = check_pinpoints(self.image_grid_pinpoints, self.vision_config.image_size)
        if self.vision_feature_select != "patch":
            raise ValueError("image_grid_pinpoints (AnyRes) lays patch features out as a grid: vision_feature_select must be 'patch'")

    @property
    def projector_depth(self) -> int:
        """Number of Linear layers in W: 1 for 'linear', N for 'mlpNx_gelu'."""
        depth = PROJECTOR_PATTERN.match(self.projector_type).group(2)
        return int(depth) if depth else 1

    @property
    def feature_layers(self) -> list:
        """vision_feature_layer as a list: the tower hidden states W reads, side by side on the channels."""
        return list(self.vision_feature_layer) if isinstance(self.vision_feature_layer, (list, tuple)) else [self.vision_feature_layer]

    @property
    def tower_has_cls(self) -> bool:
        return self.vision_config.model_type not in TOWERS_WITHOUT_CLS

    @property
    def num_patches(self) -> int:
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image (per tile with AnyRes): the tower's patches, plus CLS when it is kept."""
        return self.num_patches + int(self.vision_feature_select == "cls_patch")


LlavaPluginConfig.register_for_auto_class()

__all__ = ["LlavaPluginConfig", "OpenClipVisionConfig"]
