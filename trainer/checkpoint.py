"""Training checkpoints: Accelerate's full state (model, optimizer, scheduler, RNG) plus our position in the data,
written to a temporary folder, flushed to disk, sealed with a manifest (every file's size and sha256, written last)
and renamed into place, so a kill or a power cut during a save leaves the previous one intact. On resume the newest
checkpoint whose files match its manifest is loaded; a damaged one is named and passed over."""

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from accelerate.utils import broadcast_object_list

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: what it lists is what a complete checkpoint holds


def checkpoints(output: Path) -> list[Path]:
    """Every checkpoint folder of the run, intact or not, oldest first (a temporary folder is none)."""
    found = [path for path in output.glob("checkpoint-*") if path.name.split("-")[1].isdigit()
             and ((path / MANIFEST).exists() or (path / STATE_FILE).exists())]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def latest(output: Path) -> Path | None:
    found = checkpoints(output)
    return found[-1] if found else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)  # hashlib releases the GIL on large chunks: files hash in parallel threads
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to the disk (a folder: the names in it, such as a rename)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(folder: Path) -> None:
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in files:
        fsync(path)
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        hashes = list(pool.map(sha256, files))
    manifest = {"files": {str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": digest}
                          for path, digest in zip(files, hashes)}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync(folder / MANIFEST)
    fsync(folder)


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches its manifest."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        # A save renames its folder into place after the manifest: without one, an older llava-train wrote it.
        if (folder / STATE_FILE).exists():
            logger.warning("checkpoint %s has no %s (an older llava-train wrote it): loading it unverified", folder, MANIFEST)
            return None
        return f"it has no {MANIFEST}"
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is unreadable ({error})"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
    with ThreadPoolExecutor(max_workers=min(8, len(listed) or 1)) as pool:
        for name, digest in zip(listed, pool.map(sha256, [folder / name for name in listed])):
            if digest != listed[name]["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def newest_intact(output: Path) -> Path | None:
    """The newest checkpoint that verifies; each damaged newer one is named in a warning. Raises when checkpoints
    exist but none is intact: starting over silently would throw the run away."""
    found = checkpoints(output)
    for folder in reversed(found):
        problem = damage(folder)
        if problem is None:
            return folder
        logger.warning("checkpoint %s is damaged: %s; trying an older one", folder, problem)
    if found:
        raise ValueError(f"no intact checkpoint in {output} to resume from ({', '.join(p.name for p in found)} are damaged, "
                         "see the warnings): delete them to start over, or choose a new --output")
    return None


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
        write_manifest(temporary)
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        fsync(output)
        for old in checkpoints(output)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in output.glob(".tmp-checkpoint-*"):  # left by a kill during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, output: Path) -> tuple[Path, dict] | None:
    """Loads the newest intact checkpoint into the prepared objects; returns it and our saved state, or None if the
    run has no checkpoint. The main process verifies (hashing once) and tells the others which one to load."""
    choice = [None]
    if accelerator.is_main_process:
        try:
            found = newest_intact(output)
            choice = [str(found) if found else None]
        except ValueError as error:
            choice = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if isinstance(choice[0], ValueError):
        raise choice[0]
    if choice[0] is None:
        return None
    folder = Path(choice[0])
    accelerator.load_state(str(folder))
    return folder, json.loads((folder / STATE_FILE).read_text())
