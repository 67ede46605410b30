"""``python -m derive``: the command line."""

from __future__ import annotations

import sys

from derive.cli.main import main

sys.exit(main())
