"""``python -m export --model tiny --components 2 --out model_repository`` (see export.cli)."""

import sys

from export.cli import main

sys.exit(main())
