"""Which dtype each weight trains and is saved in. Trainable weights, and so the optimizer state built on them, are
fp32 whatever the starting checkpoint's dtype: in fp16, Adam's second moment underflows and the updates overflow
within a few steps (the shipped fp16 model went NaN at step 2). Mixed precision lowers the compute only, through
autocast. The final model goes back to the starting dtype, or to --save-dtype."""

from collections import Counter

import torch

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def starting_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's weights are in: the checkpoint's dtype."""
    counts = Counter()
    for parameter in model.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0]


def set_training_dtypes(model: torch.nn.Module, mixed_precision: str) -> torch.dtype:
    """Call after freezing. Frozen weights keep a half dtype only when autocast computes in that very dtype (a bf16
    checkpoint under --mixed-precision bf16: a 7B frozen tower or LoRA base stays half the size); otherwise the whole
    model goes to fp32, so that --mixed-precision no computes in fp32 and autocast on a CPU never meets fp16 weights
    with bf16 activations ("mixed dtype (CPU)"). Returns the starting dtype."""
    start = starting_dtype(model)
    if COMPUTE_DTYPES.get(mixed_precision) != start:
        model.float()
    else:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return start


def cast_for_saving(state_dict: dict, dtype: torch.dtype) -> dict:
    """Tensors that share storage (tied embeddings) stay shared, so save_pretrained still writes them once."""
    cast: dict[tuple, torch.Tensor] = {}
    result = {}
    for key, value in state_dict.items():
        if value.is_floating_point() and value.dtype != dtype:
            identity = (value.data_ptr(), value.shape, value.stride())
            value = cast.setdefault(identity, value.to(dtype))
        result[key] = value
    return result


def nonfinite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity (also what a cast to fp16 overflowed)."""
    return [key for key, value in state_dict.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def record_dtype(config, dtype: torch.dtype) -> None:
    """save_pretrained writes the in-memory (fp32) dtype into config.json; the saved tensors are in `dtype`."""
    name = str(dtype).removeprefix("torch.")
    config.dtype = name
    for key in config.sub_configs:
        if (sub_config := getattr(config, key, None)) is not None:
            sub_config.dtype = name
