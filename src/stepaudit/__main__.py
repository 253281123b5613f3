"""``python -m stepaudit`` is the ``stepaudit`` command."""

import sys

from .cli import main

sys.exit(main())
