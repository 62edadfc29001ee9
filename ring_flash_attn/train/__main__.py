"""``python -m ring_flash_attn.train``: the train command on its own (also under torchrun -m)."""

from ..cli_common import run
from .command import main

run(main)
