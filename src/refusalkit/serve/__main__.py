"""`python -m refusalkit.serve RUN_DIR`: the local page without the `refusalkit` command."""

import sys

from refusalkit.serve import main

sys.exit(main())
