"""The guard against a diverging run: every optimizer step's loss and gradient norm must be finite before the update
is applied. A non-finite batch is skipped (its update dropped) while the --skip-nonfinite budget lasts; past it the
run stops with the step named, leaving its checkpoints as they were and saving no final model."""

import math

import torch


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient with no skips left."""


class FiniteGuard:
    def __init__(self, accelerator, budget: int, skipped: int = 0):
        self.accelerator = accelerator
        self.budget = budget
        self.skipped = skipped  # carried in the checkpoint's state: a resumed run continues the same budget
        # A GradScaler (fp16) meets infinite gradients by design while it finds its scale, and skips those steps itself.
        self.scaler_handles_gradients = accelerator.scaler is not None
        # DeepSpeed applies the update inside backward(): a bad batch cannot be skipped, only stopped at.
        self.can_skip = accelerator.distributed_type.value != "DEEPSPEED"

    def step_is_finite(self, step: int, bad_losses: torch.Tensor, loss: torch.Tensor, grad_norm) -> bool:
        """True to apply the step's update, False to skip it; raises NonFiniteError when the budget is spent.
        Reading the verdict waits for the device once per optimizer step; every process reaches the same one."""
        bad = bad_losses.float().reshape(())
        if grad_norm is not None and not self.scaler_handles_gradients:
            bad = bad + (~torch.isfinite(grad_norm.detach().float())).float().to(bad.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return True
        loss_value = float(loss)
        norm_value = float(grad_norm) if grad_norm is not None else math.nan
        what = f"step {step}: loss {loss_value:.4g}, gradient norm {norm_value:.4g}"
        if not self.can_skip or self.skipped >= self.budget:
            raise NonFiniteError(f"{what}: training diverged and stopped"
                                 + (f" after skipping {self.skipped} non-finite batches (--skip-nonfinite {self.budget})"
                                    if self.budget else "")
                                 + "; no final model was saved")
        self.skipped += 1
        self.accelerator.print(f"{what}: skipped this batch ({self.skipped} of --skip-nonfinite {self.budget})")
        return False
