"""``python -m metagrad``: the same command line as the ``metagrad`` script (see :mod:`metagrad.cli`)."""

import sys

from .cli import main

sys.exit(main())
