"""``python -m memformer_fast``: the ``memformer-fast`` command line."""

import sys

from .app.cli import main

sys.exit(main())
