"""``python -m sbpet.cli``: the ``sbpet`` command."""

import sys

from .main import main

sys.exit(main())
