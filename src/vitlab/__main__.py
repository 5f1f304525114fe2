"""`python -m vitlab` is the `vitlab` command."""
import sys

from .cli import main

sys.exit(main())
