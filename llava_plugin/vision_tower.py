"""Vision towers behind one call: the hidden states at one layer, from a transformers model or an open_clip ViT.

Layers are indexed as transformers' `hidden_states`: 0 is the embedding output (after the pre-norm), i the output
of block i, negative indices count from the end. This file ships as remote code; open_clip is imported only when an
open_clip tower is built.
"""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers import initialization as init

from .configuration_llava_plugin import OpenClipVisionConfig


class OpenClipVisionTower(nn.Module):
    """open_clip's VisionTransformer, rebuilt from the config stored inline; weights live under `visual.`."""

    def __init__(self, config: OpenClipVisionConfig, visual: nn.Module | None = None):
        super().__init__()
        self.config = config
        if visual is None:
            try:
                # Private but stable since open_clip 2.x: builds the image tower alone, without the text tower.
                from open_clip.model import _build_vision_tower
            except ImportError as error:
                raise ImportError("this model's vision tower is an open_clip model: pip install open_clip_torch") from error
            visual = _build_vision_tower(config.embed_dim, config.vision_cfg, quick_gelu=config.quick_gelu)
        self.visual = visual

    def init_bare_parameters(self):
        """open_clip's ViT holds its class and position embeddings and its output projection as bare parameters,
        which no per-module rule covers: drawn as open_clip draws them, N(0, width^-0.5). transformers' `init`
        functions leave the ones loaded from a checkpoint alone."""
        std = self.config.hidden_size ** -0.5
        for parameter in self.visual.parameters(recurse=False):
            init.normal_(parameter, std=std)

    def hidden_state(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        num_layers = self.config.num_hidden_layers
        index = layer if layer >= 0 else num_layers + 1 + layer
        if index == 0:
            # The patch and position embeddings after the pre-norm, as transformers' CLIP gives hidden_states[0].
            return self.visual._embeds(pixel_values)
        # stop_early: blocks after the selected one never run (LLaVA's layer -2 skips the last block).
        out = self.visual.forward_intermediates(
            pixel_values, indices=[index - 1], stop_early=True, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)  # (B, 1+P, C)


def build_vision_tower(vision_config: PreTrainedConfig) -> nn.Module:
    # By model_type, not isinstance: remote code may load the config module and this one as separate copies.
    if vision_config.model_type == OpenClipVisionConfig.model_type:
        return OpenClipVisionTower(vision_config)
    return AutoModel.from_config(vision_config)


def tower_hidden_state(tower: nn.Module, pixel_values: torch.Tensor, layer: int | list[int]) -> torch.Tensor:
    """(B, tokens, C) hidden states of `tower` at `layer`, tokens = [CLS] + patches (no CLS for SigLIP); for a list
    of layers, theirs side by side: (B, tokens, C x layers)."""
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if isinstance(tower, OpenClipVisionTower):
        states = [tower.hidden_state(pixel_values, index) for index in layers]  # each pass stops at its layer
    else:
        hidden_states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        states = [hidden_states[index] for index in layers]
    return states[0] if len(states) == 1 else torch.cat(states, dim=-1)


__all__ = ["OpenClipVisionTower", "build_vision_tower", "tower_hidden_state"]
