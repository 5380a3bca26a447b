"""`python -m crsm ...`: the `crsm` command."""
import sys

from .cli import main

sys.exit(main())
