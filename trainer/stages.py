"""What trains in each stage, as data, and the one function that applies it (and says what it did)."""

import logging

from torch import nn

logger = logging.getLogger(__name__)

# Stage 1 (feature alignment): theta = W. Stage 2 (end-to-end): theta = (W, phi). The tower never trains.
TRAINABLE = {
    1: {"vision_tower": False, "projector": True, "language_model": False},
    2: {"vision_tower": False, "projector": True, "language_model": True},
}
LORA_TARGETS = "all-linear"  # every Linear of the language model but its output head


def add_lora(model, r: int, alpha: int, dropout: float):
    """LoRA adapters on the language model only (not the tower, not W), through peft."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model.language_model = get_peft_model(model.language_model, config)
    return model


def merge_lora(model):
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()
    return model


def freeze(model, stage: int, lora: bool = False) -> dict[str, int]:
    """Sets requires_grad per part for the stage; with LoRA the language model trains through its adapters only.
    Returns trainable parameter counts per part, which are also logged."""
    for part, trains in TRAINABLE[stage].items():
        getattr(model, part).requires_grad_(trains and not (lora and part == "language_model"))
    if lora:
        for name, parameter in model.language_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    model.vision_tower.eval()  # frozen: no dropout, no batch statistics
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters() if p.requires_grad) for part in TRAINABLE[stage]}
    if getattr(model, "image_newline", None) is not None:  # AnyRes: the row-end embedding is new, like W; it trains with W
        model.image_newline.requires_grad_(TRAINABLE[stage]["projector"])
        counts["image_newline"] = model.image_newline.numel() if model.image_newline.requires_grad else 0
    logger.info("stage %d%s trains %s", stage, " (LoRA)" if lora else "", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


def parameter_groups(model: nn.Module, lr: float, projector_lr: float | None, weight_decay: float) -> list[dict]:
    mine = ("projector.", "image_newline")  # W and (AnyRes) its row-end embedding, at the projector's rate
    projector = [p for name, p in model.named_parameters() if p.requires_grad and name.startswith(mine)]
    others = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith(mine)]
    groups = [{"params": projector, "lr": projector_lr or lr, "weight_decay": weight_decay}]
    if others:
        groups.append({"params": others, "lr": lr, "weight_decay": weight_decay})
    return groups
