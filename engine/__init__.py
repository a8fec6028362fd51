"""The chat engine behind the app: loads a checkpoint and streams answers; usable without Gradio."""

from .chat import ChatEngine, ChatError

__all__ = ["ChatEngine", "ChatError"]
