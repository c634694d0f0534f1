"""``python -m orthograd_fast demo ...`` -- the same as the ``orthograd-fast`` command."""

import sys

from .unlearning.cli import main

sys.exit(main())
