"""``python -m machined`` runs the daemon."""

import sys

from machined.cli import main

sys.exit(main())
