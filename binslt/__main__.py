"""``python -m binslt ...`` and ``torchrun --nproc_per_node=K -m binslt ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
