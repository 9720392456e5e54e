"""Try a run's models interactively: the terminal chat (`refusalkit chat`, chat/terminal.py) and the
model-under-a-setting engine (chat/engine.py) that the chat and the local page (`refusalkit serve`)
share. Importing the package imports neither (both import torch): the command table reads the options
from chat/options.py."""
