"""Training settings: one typed dataclass. CLI flags and YAML files (`--config`) map onto the same fields, so each
setting is declared once; precedence is defaults < preset/YAML < command line."""

import argparse
import dataclasses
import importlib.util
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

PRESETS = Path(__file__).resolve().parent / "presets"
SAVE_DTYPES = ("float32", "float16", "bfloat16")
# Accelerate's trackers and the packages each needs; Accelerate itself drops a missing one without a word.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "aim": ("aim",)}


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def check_model_source(flag: str, value: str | None):
    """A model named on the command line is a folder or a hub id (NAME or OWNER/NAME); say which it is not before
    anything loads (the hub's own message for a mistyped path is "Repo id must be in the form ...")."""
    if not value or value.startswith("open_clip:") or Path(value).expanduser().is_dir() or HUB_ID.fullmatch(value):
        return
    raise ValueError(f"{flag} {value}: no such folder (and not a hub id, which reads NAME or OWNER/NAME)")


@dataclass
class TrainSettings:
    stage: int = 1
    # Model: stage 1 assembles one from parts; stage 2 continues from a checkpoint.
    model: str | None = None
    vision: str | None = None
    llm: str | None = None
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    image_aspect: str = "pad"
    system_prompt: str | None = None
    image_after_text: bool = False
    image_grid_pinpoints: str | None = None  # AnyRes canvases "HxW,HxW,..." (see pinpoints())
    # Data
    data: list[str] = dataclasses.field(default_factory=list)
    image_folder: str = "."
    max_length: int = 2048
    template: str = "chat"
    image_placement: str = "front"
    strict: bool = False
    check_data: bool = False
    cache_vision_features: str | None = None
    # Optimisation
    output: str = "out"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-5
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    skip_nonfinite: int = 0
    seed: int = 0
    group_by_length: bool = True
    length_bucket: int = 1
    num_workers: int = 0
    # LoRA (stage 2)
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    merge_lora: bool = True
    # Runtime
    mixed_precision: str = "no"
    save_dtype: str | None = None
    gradient_checkpointing: bool = False
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 10
    report_to: str | None = None

    def validate(self) -> "TrainSettings":
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")
        for flag, value in (("--model", self.model), ("--llm", self.llm), ("--vision", self.vision)):
            check_model_source(flag, value)
        if not self.model and not (self.vision and self.llm):
            raise ValueError(f"stage {self.stage} needs --model (a llava_plugin checkpoint: for stage 2 usually the stage 1 "
                             "output) or --vision and --llm (a fresh projector; for stage 2 that skips feature alignment)")
        if (self.system_prompt is not None or self.image_after_text) and self.model:
            raise ValueError("--system-prompt and --image-after-text set the chat template of a model assembled from "
                             "--vision/--llm; a --model checkpoint keeps the template it was trained with")
        if self.lora and self.stage != 2:
            raise ValueError("--lora trains the language model, which only stage 2 does")
        if not self.data:
            raise ValueError("--data is required (LLaVA JSON/JSONL, parquet, a datasets folder or hub id; several allowed)")
        if self.template not in ("chat", "plain"):
            raise ValueError(f"--template must be chat or plain, got {self.template!r}")
        if self.image_placement not in ("front", "keep", "random"):
            raise ValueError(f"--image-placement must be front, keep or random, got {self.image_placement!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError("--batch-size, --grad-accum and --log-every must be at least 1")
        if self.length_bucket < 1:
            raise ValueError(f"--length-bucket must be at least 1 (token), got {self.length_bucket}")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype}")
        if self.skip_nonfinite < 0:
            raise ValueError(f"--skip-nonfinite must be 0 or more (batches), got {self.skip_nonfinite}")
        for tracker in self.trackers():
            if tracker not in TRACKERS:
                raise ValueError(f"--report-to {tracker}: not a tracker llava-train knows; choose from {', '.join(TRACKERS)}")
            if not any(importlib.util.find_spec(package) for package in TRACKERS[tracker]):
                raise ValueError(f"--report-to {tracker} needs the {TRACKERS[tracker][0]} package, which is not installed: "
                                 f"pip install {TRACKERS[tracker][0]}")
        if self.image_grid_pinpoints is not None and self.model:
            raise ValueError("--image-grid-pinpoints makes a model assembled from --vision/--llm AnyRes; a --model "
                             "checkpoint keeps the pinpoints it was trained with")
        self.pinpoints()  # a malformed list fails here, before any model loads
        return self

    def trackers(self) -> list[str]:
        return [name.strip() for name in (self.report_to or "").split(",") if name.strip()]

    def pinpoints(self) -> list[list[int]] | None:
        """--image-grid-pinpoints "336x672,672x336" -> [[336, 672], [672, 336]] (height x width)."""
        if self.image_grid_pinpoints is None:
            return None
        try:
            return [[int(v) for v in item.lower().split("x")] for item in self.image_grid_pinpoints.replace(" ", "").split(",")]
        except ValueError as error:
            raise ValueError(f"--image-grid-pinpoints must read HEIGHTxWIDTH,HEIGHTxWIDTH,... (e.g. 336x672,672x336), "
                             f"got {self.image_grid_pinpoints!r}") from error


HELP = {
    "stage": "1: feature alignment (projector only); 2: instruction tuning (projector and language model)",
    "model": "a llava_plugin checkpoint to continue from (stage 2: the stage 1 output)",
    "vision": "vision tower: HF id or folder (CLIP, SigLIP), or open_clip:NAME[:PRETRAINED]",
    "llm": "causal language model: HF id or folder",
    "projector": "linear or mlpNx_gelu",
    "vision_feature_layer": "tower hidden state fed to the projector (transformers' indexing)",
    "image_aspect": "pad, resize or crop",
    "system_prompt": "with --vision/--llm: the chat template's system prompt (default: LLaVA v1's)",
    "image_after_text": "with --vision/--llm: the chat template puts each turn's image after its text, for training and use "
                        "(in a prompt for the next answer, after the newest question)",
    "image_grid_pinpoints": "with --vision/--llm: AnyRes (LLaVA-NeXT) canvases, HEIGHTxWIDTH,... in multiples of the "
                            "tower's size (e.g. 336x672,672x336,672x672,1008x336,336x1008)",
    "data": "LLaVA JSON/JSONL files, parquet files (a file, folder or glob), datasets folders (save_to_disk) or hub ids "
            "(owner/name[:split]), with columns id, image (path, bytes or a list), conversations",
    "template": "chat: the model's chat template; plain: LLaVA's stage-1 format (image, caption, newline; the caption is learned)",
    "image_placement": "front: a record's image goes before its question (the original's rule); keep: where the data puts it; "
                       "random: before or after the question, seeded, where the data does not place it",
    "image_folder": "folder the records' image paths are relative to",
    "max_length": "samples longer than this many tokens are skipped",
    "strict": "fail on the first unusable sample instead of skipping it",
    "check_data": "check every sample (images decoded) and exit: 0 if all are usable, 1 otherwise",
    "cache_vision_features": "folder for the frozen tower's features, computed once per image",
    "output": "folder for the final model, checkpoints and metrics",
    "epochs": "passes over the data (fractions allowed)",
    "max_steps": "optimizer steps; overrides --epochs when positive",
    "skip_nonfinite": "batches with a non-finite loss or gradient to skip (update dropped) before stopping; default 0: "
                      "stop at the first",
    "batch_size": "samples per process per forward",
    "grad_accum": "forwards per optimizer step",
    "lr": "learning rate (the language model's, or LoRA's)",
    "projector_lr": "the projector's own learning rate (default: --lr)",
    "warmup_ratio": "share of the steps spent warming up",
    "scheduler": "transformers scheduler name: cosine, linear, constant_with_warmup, ...",
    "seed": "seeds the model's new weights, data order and image placement",
    "group_by_length": "batch samples of similar length and the same modality (less padding)",
    "length_bucket": "with --group-by-length: lengths within this many tokens count as equal, so their samples mix",
    "num_workers": "data loading processes",
    "lora": "stage 2: train LoRA adapters on the language model instead of all its weights",
    "merge_lora": "merge the adapters into the saved model (default); --no-merge-lora saves them apart",
    "mixed_precision": "no, fp16 or bf16: the compute's precision; trainable weights and optimizer state stay fp32",
    "save_dtype": "float32, float16 or bfloat16: the final model's dtype (default: the starting model's)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "save_every": "steps between checkpoints (0: none)",
    "keep_checkpoints": "how many checkpoints to keep",
    "resume": "continue from the newest checkpoint in --output",
    "report_to": "Accelerate trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim (the package must be "
                 "installed); the curve is always in train_log.jsonl",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from the dataclass: `--max-steps` for `max_steps`, booleans as --x / --no-x."""
    parser = argparse.ArgumentParser(prog="llava-train", description="Two-stage LLaVA training on Accelerate.")
    parser.add_argument("--config", help="YAML file of settings (same keys as the flags, with underscores)")
    parser.add_argument("--preset", help=f"a shipped recipe: {', '.join(sorted(p.stem for p in PRESETS.glob('*.yaml')))}")
    for field in fields(TrainSettings):
        kind = field.type
        if kind is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=HELP.get(field.name))
        elif field.name == "data":
            parser.add_argument(_flag(field.name), nargs="+", default=None, help=HELP["data"])
        else:
            parser.add_argument(_flag(field.name), type=_parse_type(kind), default=None, help=HELP.get(field.name))
    return parser


def _parse_type(kind):
    """`float | None` -> float: the type argparse converts a flag's text to."""
    options = [option for option in typing.get_args(kind) if option is not type(None)]
    return options[0] if options else kind


def read_yaml(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    known = {field.name for field in fields(TrainSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    return data


def parse_settings(argv=None) -> TrainSettings:
    args = vars(build_parser().parse_args(argv))
    values = {}
    if preset_name := args.pop("preset"):
        preset = PRESETS / f"{preset_name}.yaml"
        if not preset.exists():
            raise ValueError(f"unknown preset {preset_name!r}; shipped: {sorted(p.stem for p in PRESETS.glob('*.yaml'))}")
        values.update(read_yaml(preset))
    if config := args.pop("config"):
        values.update(read_yaml(config))
    values.update({key: value for key, value in args.items() if value is not None})
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    return TrainSettings(**values).validate()

