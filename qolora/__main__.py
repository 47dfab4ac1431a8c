"""``python -m qolora``: the same command as ``qolora`` (for ``torchrun -m`` and ``accelerate launch -m``)."""

import sys

from .cli import main

sys.exit(main())
