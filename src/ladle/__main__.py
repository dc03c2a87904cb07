"""`python -m ladle` runs the command line."""

import sys

from ladle.cli import main

sys.exit(main())
