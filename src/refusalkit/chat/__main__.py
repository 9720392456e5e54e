"""`python -m refusalkit.chat RUN_DIR`: the terminal chat without the `refusalkit` command."""

import sys

from refusalkit.chat.terminal import main

sys.exit(main())
