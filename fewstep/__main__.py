"""`python -m fewstep ...` is the `fewstep` command (works even where the console script is not on PATH)."""
import sys

from .cli import main

sys.exit(main())
