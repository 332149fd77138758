"""``python -m server ...`` is the same as the ``degrade`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this module as __mp_main__
    sys.exit(main())
