"""One rank's ring schedule on one device against the ideal: ``ring-attn bench`` from a checkout.

The benchmark lives in :mod:`ring_flash_attn.bench` so the installed ``ring-attn``
command can run it; see that module for what is measured. From a checkout the results go to
benchmarks/results unless ``--out-dir`` says otherwise.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ring_flash_attn.bench import main  # noqa: E402

if __name__ == "__main__":
    main(default_out_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
