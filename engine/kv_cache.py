"""A DynamicCache over key and value tensors one already has, without copying them, and cheaply.

`DynamicCache(ddp_cache_data=...)` feeds each layer's tensors through `update`, which concatenates them onto an
empty tensor: a whole copy of the cache. And `DynamicCache(config=...)` reads the layer types out of the config
each time (60 us on this CPU). The scheduler builds a cache every time a request joins or leaves the batch (from
tensors it has just made by padding or indexing) and the prefix cache one per request (from slices of an entry),
so both costs came once per request and row. The tensors are shared as they are: a DynamicCache only ever replaces
its tensors (concatenating, cropping to a view), never writes into them."""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# id(config) -> (config, whether every layer of its caches is a plain DynamicLayer); the config is kept so that its
# id is never another's (configs are few: one per model loaded)
_all_plain: dict[int, tuple[object, bool]] = {}


def cache_over(config, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache for `config`'s layers holding `tensors` (per layer: keys, values of (B, heads, T, head_dim))."""
    tensors = list(tensors)
    if id(config) not in _all_plain:
        _all_plain[id(config)] = config, all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
    if not _all_plain[id(config)][1]:  # sliding windows keep only their window: their own update decides what
        return DynamicCache(config=config, ddp_cache_data=tensors)
    cache = DynamicCache()
    cache.layers = [_holding(keys, values) for keys, values in tensors]
    return cache


def _holding(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer
