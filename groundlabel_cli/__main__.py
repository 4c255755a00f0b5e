"""``python -m groundlabel_cli``: the ``groundlabel`` command."""

import sys

from groundlabel_cli.main import main

sys.exit(main())
