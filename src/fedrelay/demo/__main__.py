"""``python -m fedrelay.demo``: the demo without the main CLI."""

import sys

from .cli import main

sys.exit(main())
