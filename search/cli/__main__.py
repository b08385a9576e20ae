"""`python -m search.cli ...`: the same as the `mergesearch` console script."""

import sys

from search.cli import main

sys.exit(main())
