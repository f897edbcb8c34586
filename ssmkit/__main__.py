"""``python -m ssmkit``: the same command line as the ``ssmkit`` console script."""

import sys

from ssmkit.cli import main

sys.exit(main())
