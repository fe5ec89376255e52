"""``python -m qadapter.cli``, the same command as ``python -m qadapter`` and ``qadapter``."""

import sys

from . import main

sys.exit(main())
