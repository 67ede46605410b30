"""``python -m derive.cli``."""

from __future__ import annotations

import sys

from derive.cli.main import main

sys.exit(main())
