"""The training curve as it happens: what each logging step measured (Meter), written as one JSON line in the output
folder and flushed at once, so a crash keeps every line written before it (train_metrics.json only comes at the end).
A resumed run drops the lines past the checkpoint it resumed from, which it is about to train again: one curve."""

import json
import os
import time
from pathlib import Path

import torch

LOG_FILE = "train_log.jsonl"


class RunLog:
    def __init__(self, output: Path, enabled: bool, resumed_step: int | None = None):
        self.path = output / LOG_FILE
        self.file = None
        if not enabled:
            return
        if resumed_step is not None and self.path.exists():
            self.keep_until(resumed_step)
        self.file = self.path.open("a" if resumed_step is not None else "w")  # a new run starts a new curve

    def keep_until(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line the crash cut short
                continue
            if entry.get("step", 0) <= step:
                kept.append(line + "\n")
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, self.path)

    def write(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()  # into the OS: a killed process loses nothing it wrote

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Meter:
    """Running sums: of the current optimizer step's micro-batches, of the steps since the last logging step (the
    window), and of the whole run. They stay on the device (reading one waits for the GPU) and are summed over
    processes only at logging steps, which every process reaches together."""

    KEYS = ("loss", "batches", "tokens", "padded", "samples")

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.totals = {"samples": 0, "tokens": 0, "padded": 0, "start": time.perf_counter()}
        self.step = self._zeros()
        self.step_bad = torch.zeros((), device=accelerator.device)  # micro-batches of this step with a non-finite loss
        self.reset_window()

    def _zeros(self) -> dict:
        return {key: torch.zeros((), device=self.accelerator.device) for key in self.KEYS}

    def reset_window(self) -> None:
        self.window, self.grad_norm, self.steps, self.start = self._zeros(), 0.0, 0, time.perf_counter()

    def add_batch(self, loss: torch.Tensor, samples: int, attention_mask: torch.Tensor | None) -> None:
        loss = loss.detach()
        self.step_bad = self.step_bad + (~torch.isfinite(loss)).float()
        tokens, padded = (attention_mask.sum(), attention_mask.numel()) if attention_mask is not None else (0, 0)
        for key, value in zip(self.KEYS, (loss, 1, tokens, padded, samples)):
            self.step[key] = self.step[key] + value
        self.totals["samples"] += samples

    def end_step(self, applied: bool, grad_norm) -> None:
        """The optimizer step is over; a skipped one counts in throughput, not in the curve."""
        self.totals["tokens"] += self.step["tokens"]
        self.totals["padded"] += self.step["padded"]
        if applied:
            for key in self.KEYS:
                self.window[key] = self.window[key] + self.step[key]
            if grad_norm is not None:
                self.grad_norm = self.grad_norm + grad_norm.detach().float()
            self.steps += 1
        self.step = self._zeros()
        self.step_bad = torch.zeros((), device=self.accelerator.device)

    def read(self, lr: float) -> dict:
        """The window's averages and rates over all processes; starts a new window."""
        stacked = torch.stack([self.window[key].float() for key in self.KEYS])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        loss, batches, tokens, padded, samples = stacked.tolist()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {"loss": loss / max(batches, 1), "lr": lr, "grad_norm": float(self.grad_norm) / max(self.steps, 1),
                   "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
                   "padding": 1 - tokens / padded if padded else 0.0}
        self.reset_window()
        return metrics
