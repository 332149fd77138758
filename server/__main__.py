"""``python -m server ...`` is the same as the ``degrade`` command."""

import sys

from .cli import main

sys.exit(main())
