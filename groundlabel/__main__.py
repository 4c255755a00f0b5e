"""``python -m groundlabel``: the ``groundlabel`` command (a script no module imports, so the kernel's
modules still import no composition root)."""

import sys

from groundlabel_cli.main import main

sys.exit(main())
