"""Run the `parley` command line: `python -m parley serve`."""

import sys

from parley.cli import main

sys.exit(main())
