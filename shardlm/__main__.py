"""`python -m shardlm ...` is the `shardlm` command."""

import sys

from .entrypoints.cli import main

sys.exit(main())
