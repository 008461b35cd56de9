"""``python -m liere.kernels``: build the CPU kernels ahead of time (or find them built)."""

import sys

from liere.kernels import main

sys.exit(main())
