"""``python -m workers.cli``: the ``crm-events`` command line."""

import sys

from workers.cli import main

sys.exit(main())
