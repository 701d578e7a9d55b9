"""``python -m dgr_fast train|bench ...``: the same as the ``dgr-fast`` command."""

import sys

from dgr_fast.cli import main  # imports no torch: main's Ctrl-C handler covers that slow import

sys.exit(main())
