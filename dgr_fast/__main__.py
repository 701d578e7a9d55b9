"""``python -m dgr_fast train|bench ...``: the same as the ``dgr-fast`` command."""

import sys

from dgr_fast.cli import main

sys.exit(main())
