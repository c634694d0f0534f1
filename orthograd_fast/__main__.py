"""``python -m orthograd_fast demo ...`` -- the same as the ``orthograd-fast`` command."""

import sys

from .cli import main

sys.exit(main())
