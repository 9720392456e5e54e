"""Try a run's models interactively: the terminal chat (`refusalkit chat`) and the model-under-a-setting
engine that the chat and the local page (`refusalkit serve`) share."""

from refusalkit.chat.engine import ChatModel, Setting, load_chat_model
from refusalkit.chat.terminal import ChatOptions, run_chat

__all__ = ["ChatModel", "ChatOptions", "Setting", "load_chat_model", "run_chat"]
