"""``python -m llmcore.cli``: the same as the ``llmcore`` command."""

import sys

from llmcore.cli import main

sys.exit(main())
