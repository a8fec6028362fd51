"""The chat engine behind the app: loads a checkpoint and streams answers; usable without Gradio."""

import os

# The engine is threaded (a scheduler thread steps the model, one thread per reader). OpenMP's workers spin after
# each parallel region by default, and on a small, shared CPU they starve the other threads: on a 2-core machine
# the same 32 requests took 13.4 s instead of 1.05 s. Set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .chat import ChatEngine, ChatError

__all__ = ["ChatEngine", "ChatError"]
