"""``python -m onecomp_core ...`` (and ``torchrun -m onecomp_core quantize ...``): the onecomp command."""
import sys

from .cli import main

sys.exit(main())
