"""``python -m verifier``: the same command line as ``verifier``."""
import sys

from .cli import main

sys.exit(main())
