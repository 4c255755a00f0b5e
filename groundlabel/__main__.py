import sys

from groundlabel.cli import main

sys.exit(main())
