"""``python -m ring_flash_attn.train``: the train command on its own (also under torchrun -m)."""

import sys

from .command import main

sys.exit(main())
