"""The training loop: one readable function on Accelerate, for both stages, from a laptop CPU to a cluster."""

import contextlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoProcessor, get_scheduler

from llava_plugin import LlavaPluginForConditionalGeneration

from . import checkpoint
from .batching import Collator, GroupedBatchSampler
from .dataset import LlavaDataset, check_records, estimate_lengths, record_counts, repeated_ids, unique_images
from .feature_cache import FeatureCache, cache_key
from .finite import FiniteGuard, NonFiniteError
from .precision import SAVE_DTYPES, cast_for_saving, nonfinite_tensors, record_dtype, set_training_dtypes
from .run_log import Meter, RunLog
from .settings import TrainSettings
from .sources import load_records
from .stages import add_lora, freeze, merge_lora, parameter_groups

logger = logging.getLogger(__name__)


def build_model(settings: TrainSettings):
    if settings.model:
        model = LlavaPluginForConditionalGeneration.from_pretrained(settings.model)
        return model, AutoProcessor.from_pretrained(settings.model)
    return LlavaPluginForConditionalGeneration.from_components(
        vision=settings.vision, llm=settings.llm, projector=settings.projector,
        vision_feature_layer=settings.vision_feature_layer, image_aspect=settings.image_aspect,
        system_prompt=settings.system_prompt, image_after_text=settings.image_after_text,
        image_grid_pinpoints=settings.pinpoints(),
    )


def prepare_feature_cache(settings, accelerator, model, processor, records) -> FeatureCache:
    if model.config.image_grid_pinpoints is not None:
        raise ValueError("--cache-vision-features is not supported for AnyRes models (image_grid_pinpoints) yet: "
                         "their token layout depends on each image's size, which the cache does not keep")
    cache = FeatureCache(settings.cache_vision_features, cache_key(model, processor))
    images = unique_images(records)
    model.to(accelerator.device)
    # Each process encodes its share, so no process waits on the others longer than its own part.
    failed = cache.build(model, processor, images[accelerator.process_index::accelerator.num_processes], settings.image_folder,
                         settings.batch_size, accelerator.device)
    for image, reason in list(failed.items())[:5]:
        logger.warning("vision feature cache: %s", reason)
    accelerator.wait_for_everyone()
    return cache


def check_data(settings: TrainSettings) -> int:
    """--check-data: every problem, before any training; exit status 1 if there are any."""
    # Only the processor is needed: from a checkpoint it loads without the weights.
    processor = AutoProcessor.from_pretrained(settings.model) if settings.model else build_model(settings)[1]
    records = load_records(settings.data, settings.seed)
    problems = check_records(records, processor, settings.seed, settings.max_length, settings.image_folder,
                             settings.template, settings.image_placement)
    print(f"{len(records)} records checked: {sum(map(len, problems.values()))} problems")
    if repeats := repeated_ids(records):  # legal: the original's ids are image ids
        print(f"{len(repeats)} ids are shared by {sum(repeats.values())} records (records are told apart by position)")
    for kind, items in problems.items():
        print(f"- {kind}: {len(items)}")
        for item in items[:5]:
            print(f"    {item}")
    return 1 if problems else 0


def zero_loss(model) -> torch.Tensor:
    """0, connected to every trainable parameter, so each receives a (zero) gradient."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def training_loss(model, batch: dict, tokenizer) -> torch.Tensor:
    """The batch's answer loss. Every process must run a forward and give every trainable parameter a gradient for
    the gradient sync to complete: a batch without images leaves the projector out (text-only samples), and a batch
    whose samples were all unusable has nothing to run, so it runs one dummy token at weight 0."""
    if "input_ids" not in batch:
        token = torch.tensor([[tokenizer.eos_token_id]], device=next(model.parameters()).device)
        return model(input_ids=token).logits.sum() * 0.0 + zero_loss(model)
    loss = model(**batch).loss
    if "pixel_values" not in batch and "vision_features" not in batch:
        loss = loss + zero_loss(model)
    return loss


def train(settings: TrainSettings) -> Path:
    output = Path(settings.output)
    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum, mixed_precision=settings.mixed_precision,
                              log_with=settings.trackers() or None, project_dir=str(output))
    set_seed(settings.seed)
    output.mkdir(parents=True, exist_ok=True)
    records = load_records(settings.data, settings.seed)  # bad or empty data stops the run before a model loads
    model, processor = build_model(settings)
    if settings.lora:
        add_lora(model, settings.lora_r, settings.lora_alpha, settings.lora_dropout)
    trainable = freeze(model, settings.stage, settings.lora)
    start_dtype = set_training_dtypes(model, settings.mixed_precision)
    if accelerator.is_main_process:
        print(f"stage {settings.stage} on {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}, "
              f"{accelerator.device}): training " + ", ".join(f"{part} ({count:,} parameters)" for part, count in trainable.items() if count))
    if settings.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    cache = prepare_feature_cache(settings, accelerator, model, processor, records) if settings.cache_vision_features else None
    dataset = LlavaDataset(records, processor, settings.seed, settings.max_length, settings.image_folder, settings.strict, cache,
                           settings.template, settings.image_placement)
    lengths = estimate_lengths(records, processor)
    sampler = GroupedBatchSampler(lengths, (record_counts(records)[0] > 0).tolist(), settings.batch_size, settings.seed, settings.group_by_length,
                                  length_bucket=settings.length_bucket)
    # Persistent workers keep the tokens their dataset copy has rendered (see LlavaDataset) from epoch to epoch. The
    # loader's own generator seeds its workers: without it, each new iterator (a resumed one too) draws from the global
    # stream that dropout draws from, and a resumed run's dropout masks would differ from the uninterrupted run's.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(processor.tokenizer.pad_token_id),
                        num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0,
                        generator=torch.Generator().manual_seed(settings.seed))
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.lr, settings.projector_lr, settings.weight_decay))
    steps_per_epoch = max(math.ceil(len(sampler) / accelerator.num_processes / settings.grad_accum), 1)
    total_steps = settings.max_steps if settings.max_steps > 0 else math.ceil(settings.epochs * steps_per_epoch)
    # Accelerate steps a prepared scheduler once per process at every optimizer step: count in those units.
    scheduler = get_scheduler(settings.scheduler, optimizer,
                              num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps) * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if settings.report_to:
        accelerator.init_trackers("llava-train", config={k: v for k, v in vars(settings).items() if isinstance(v, (int, float, str, bool))})

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "nonfinite_skipped": 0}
    if not settings.resume and checkpoint.latest(output) is not None:
        raise ValueError(f"{output} holds checkpoints of an earlier run: pass --resume to continue it, or choose a new --output")
    if settings.resume and (resumed := checkpoint.resume(accelerator, output)) is not None:
        state.update(resumed[1])
        accelerator.print(f"resumed from {resumed[0]} at step {state['step']}")
    run_log = RunLog(output, accelerator.is_main_process, state["step"] if settings.resume else None)
    try:
        skipped = run_steps(settings, accelerator, model, optimizer, scheduler, loader, sampler, processor, state, total_steps, run_log)
        report_skipped(accelerator, skipped, output)
        save_final(accelerator, model, processor, output, settings, SAVE_DTYPES.get(settings.save_dtype, start_dtype))
    except NonFiniteError as error:
        last = checkpoint.latest(output)
        raise NonFiniteError(f"{error}; the last good checkpoint is {last or 'none (no checkpoint was saved yet)'}") from None
    finally:
        run_log.close()
        accelerator.end_training()  # last: it also ends the process group
    return output


def run_steps(settings, accelerator, model, optimizer, scheduler, loader, sampler, processor, state, total_steps, run_log):
    """The optimizer steps from state["step"] to total_steps; state is updated in place (it is what a checkpoint
    saves). Returns the unusable samples met on the way."""
    output = Path(settings.output)
    guard = FiniteGuard(accelerator, settings.skip_nonfinite, state["nonfinite_skipped"])
    meter = Meter(accelerator)
    first_step = state["step"]
    skipped: list[tuple[str, str]] = []
    clip = settings.max_grad_norm if settings.max_grad_norm > 0 else math.inf  # inf: measure the norm, change nothing
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"stage {settings.stage}", disable=not accelerator.is_main_process)
    try:
        while state["step"] < total_steps:
            loader.set_epoch(state["epoch"])  # Accelerate's loader re-applies its own epoch at every pass: keep it in step
            sampler.set_epoch(state["epoch"])  # and our sampler directly: the multi-process sharding wrapper does not pass it on
            epoch_loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else loader
            for batch in epoch_loader:
                state["batches_in_epoch"] += 1
                skipped += batch.pop("skipped")
                samples = len(batch.pop("ids"))
                with accelerator.accumulate(model):
                    loss = training_loss(model, batch, processor.tokenizer)
                    accelerator.backward(loss)
                    meter.add_batch(loss, samples, batch.get("attention_mask"))
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                        mean_loss = meter.step["loss"] / meter.step["batches"]
                        applied = guard.step_is_finite(state["step"] + 1, meter.step_bad, mean_loss, grad_norm)
                        if applied:
                            optimizer.step()
                            scheduler.step()
                        elif accelerator.scaler is not None:
                            accelerator.scaler.update()  # closes the unscale_ the clipping did, as a skipped step would
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                meter.end_step(applied, grad_norm)
                state["nonfinite_skipped"] = guard.skipped
                if not applied:
                    continue
                state["step"] += 1
                bar.update()
                if state["step"] % settings.log_every == 0 or state["step"] == total_steps:
                    log_step(accelerator, bar, meter, scheduler, state, run_log)
                if settings.save_every > 0 and state["step"] % settings.save_every == 0 and state["step"] < total_steps:
                    checkpoint.save(accelerator, output, state["step"], state, settings.keep_checkpoints)
                if state["step"] >= total_steps:
                    break
            else:
                state["epoch"] += 1
                state["batches_in_epoch"] = 0
    finally:
        bar.close()  # before an error's message, not over it
    write_metrics(accelerator, meter.totals, state["step"] - first_step, state, output)
    return skipped


def log_step(accelerator, bar, meter, scheduler, state, run_log):
    metrics = meter.read(scheduler.get_last_lr()[0])
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    accelerator.log(metrics, step=state["step"])
    run_log.write({"step": state["step"], "epoch": state["epoch"], **metrics, "nonfinite_skipped": state["nonfinite_skipped"],
                   "time": round(time.time(), 3)})


def write_metrics(accelerator, totals, steps, state, output: Path):
    """Throughput of the loop itself (model loading and saving excluded), summed over processes."""
    seconds = time.perf_counter() - totals["start"]
    samples = sum(gather_object([totals["samples"]])) if accelerator.num_processes > 1 else totals["samples"]
    metrics = {"steps": steps, "samples": samples, "seconds": round(seconds, 3),
               "samples_per_s": samples / seconds if seconds else 0.0,
               "padding": 1 - float(totals["tokens"]) / float(totals["padded"]) if float(totals["padded"]) else 0.0,
               "nonfinite_skipped": state["nonfinite_skipped"]}
    if accelerator.is_main_process:
        (output / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"trained {metrics['steps']} steps, {samples} samples in {seconds:.1f} s ({metrics['samples_per_s']:.2f} samples/s, "
              f"padding {metrics['padding']:.1%})")
        if state["nonfinite_skipped"]:
            print(f"skipped {state['nonfinite_skipped']} batch(es) with a non-finite loss or gradient (--skip-nonfinite)")


def report_skipped(accelerator, skipped, output: Path):
    everything = gather_object(skipped) if accelerator.num_processes > 1 else skipped
    if not accelerator.is_main_process or not everything:
        return
    unique = dict(everything)  # a sample seen in several epochs counts once
    reasons = Counter(reason.split(": ", 1)[-1].split(" (")[0][:60] for reason in unique.values())
    print(f"skipped {len(unique)} unusable samples (see {output / 'skipped.json'}):")
    for reason, count in reasons.most_common():
        print(f"- {count} x {reason}")
    print("  first: " + ", ".join(list(unique)[:5]))
    (output / "skipped.json").write_text(json.dumps(unique, indent=1))


@contextlib.contextmanager
def plain_class(model):
    """FSDP2 swaps the model's class for a generated subclass defined in torch; save_pretrained would ship that
    class's source as the remote code. Save under our own class (the weights come from the gathered state dict)."""
    sharded_class = type(model)
    model.__class__ = LlavaPluginForConditionalGeneration
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def save_final(accelerator, model, processor, output: Path, settings: TrainSettings, dtype: torch.dtype):
    """The final model at the top of the output folder, in `dtype`, loadable by from_pretrained and the app. Written
    to a temporary folder first; config.json moves in last, so a folder without it was never finished. Weights that
    are not finite (or overflow `dtype`) are never saved."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    temporary = output / ".tmp-final"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    if settings.lora and settings.merge_lora:
        merge_lora(unwrapped)
    elif settings.lora:  # the adapter apart (peft format), the model beside it with the original language model
        if accelerator.is_main_process:
            unwrapped.language_model.save_pretrained(temporary / "lora_adapter")
        unwrapped.language_model = unwrapped.language_model.unload()
    state_dict = accelerator.get_state_dict(model)  # the prepared model: DeepSpeed/FSDP gather through their wrappers
    if not accelerator.is_main_process:
        return
    state_dict = cast_for_saving(state_dict, dtype)
    if broken := nonfinite_tensors(state_dict):
        shutil.rmtree(temporary, ignore_errors=True)
        raise NonFiniteError(f"{len(broken)} of {len(state_dict)} tensors of the final model are not finite in {dtype} "
                             f"({', '.join(broken[:3])}, ...): it was not saved")
    with plain_class(unwrapped):
        unwrapped.save_pretrained(temporary, state_dict=state_dict)
    record_dtype(unwrapped.config, dtype)
    unwrapped.config.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    for path in temporary.rglob("*"):
        checkpoint.fsync(path)  # on the disk before config.json says the model is complete
    files = sorted(temporary.iterdir(), key=lambda path: path.name == "config.json")
    for path in files:
        if path.is_dir():
            shutil.rmtree(output / path.name, ignore_errors=True)
        path.replace(output / path.name)
    temporary.rmdir()
    checkpoint.fsync(output)
    print(f"saved the final model ({str(dtype).removeprefix('torch.')}) to {output}")
