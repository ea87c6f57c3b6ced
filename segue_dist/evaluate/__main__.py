"""`python -m segue_dist.evaluate`: the flags and errors of `segue evaluate`."""

import sys

from segue_dist.evaluate.cli import main

sys.exit(main())
