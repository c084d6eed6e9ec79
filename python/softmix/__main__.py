"""``python -m softmix``: see ``softmix.cli``."""

import sys

from softmix.cli import main

sys.exit(main())
