"""`python -m ranklens`: the `ranklens` command."""

import sys

from ranklens.cli import main

sys.exit(main())
