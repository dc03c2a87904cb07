"""`python -m ladle.engine.kernels [ISA ...] [--out DIR]`: build the kernel libraries."""

import sys

from ladle.engine.kernels.build import main

sys.exit(main())
