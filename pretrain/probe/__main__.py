"""``python -m pretrain.probe``: see :mod:`pretrain.probe.cli`."""

import sys

from pretrain.probe.cli import main

sys.exit(main())
