"""Training checkpoints: Accelerate's full state (model, optimizer, scheduler, RNG) plus our position in the data,
written to a temporary folder and renamed into place, so a kill during a save leaves the previous one intact."""

import json
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"  # written last: a folder without it is not a checkpoint


def checkpoints(output: Path) -> list[Path]:
    found = [path for path in output.glob("checkpoint-*") if (path / STATE_FILE).exists() and path.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def latest(output: Path) -> Path | None:
    found = checkpoints(output)
    return found[-1] if found else None


def save(accelerator, output: Path, step: int, state: dict, keep: int) -> Path:
    final = output / f"checkpoint-{step}"
    temporary = output / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in checkpoints(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in output.glob(".tmp-checkpoint-*"):  # left by a kill during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
