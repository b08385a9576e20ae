"""`python -m search.cli ...`: the same as the `mergesearch` console script."""

from search.cli import console_main

console_main()
