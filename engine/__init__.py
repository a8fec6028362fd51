"""The chat engine behind the app: loads a checkpoint and streams answers; usable without Gradio."""

import os

# The engine is threaded (a scheduler thread steps the model, one thread per reader). OpenMP's workers spin after
# each parallel region by default, and on a small, shared CPU they starve the other threads: on a 2-core machine
# the same 32 requests took 13.4 s instead of 1.05 s. Set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["ChatEngine", "ChatError", "NonFiniteScores"]


def __getattr__(name: str):
    """`from engine import ChatEngine` loads torch and transformers then, not at `import engine`: the command lines
    under engine/ answer --help without them."""
    if name in __all__:
        from . import chat

        return getattr(chat, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
