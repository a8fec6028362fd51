"""Stage 1's vision feature cache: the frozen tower's output for each image, computed once, then read instead of
running the tower. Keyed by everything that shapes those features (tower config and weights' identity, layer,
selection, preprocessing), so a change of any of them uses a fresh folder instead of stale features."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_plugin import ImageLoadError

from .data import DataError, ImageRef, image_key, open_image


def cache_key(model, processor) -> str:
    config = model.config
    identity = {
        "tower": config.vision_config.to_dict(),
        "layer": config.vision_feature_layer,
        "select": config.vision_feature_select,
        "preprocess": processor.image_processor.to_dict(),
        # A cheap fingerprint of the weights: same config with other weights must not share a cache.
        "weights": float(sum(p.detach().double().sum() for p in model.vision_tower.parameters())),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    def __init__(self, folder: str, key: str):
        self.folder = Path(folder) / key

    def path(self, image: str) -> Path:
        return self.folder / f"{hashlib.sha1(image.encode()).hexdigest()}.safetensors"

    def load(self, image: str) -> torch.Tensor:
        path = self.path(image)
        if not path.exists():
            raise DataError(f"no cached vision features for {image} (its image could not be read when the cache was built)")
        return load_file(str(path))["features"]  # (1, S, C)

    @torch.no_grad()
    def build(self, model, processor, images: list[ImageRef], image_folder: str, batch_size: int, device) -> dict[str, str]:
        """Computes what is missing; returns {image key: reason} for images that could not be read. An image is
        known by its path, or by the hash of its bytes when the data embeds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        missing = sorted({image_key(image): image for image in images if not self.path(image_key(image)).exists()}.items())
        failed = {}
        for start in range(0, len(missing), batch_size):
            names, pixels = [], []
            for name, image in missing[start:start + batch_size]:
                try:
                    pixels.append(processor.image_processor(open_image(image, image_folder), return_tensors="pt")["pixel_values"])
                    names.append(name)
                except ImageLoadError as error:
                    failed[name] = str(error)
            if not names:
                continue
            features = model.get_vision_features(torch.cat(pixels).to(device)).cpu()
            for name, feature in zip(names, features):
                temporary = self.path(name).with_suffix(".tmp")
                save_file({"features": feature[None].contiguous()}, str(temporary))
                temporary.replace(self.path(name))  # a kill mid-write leaves no half file under the real name
        return failed
