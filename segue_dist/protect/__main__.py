"""`python -m segue_dist.protect` (what torchrun / accelerate launch start): the flags and errors of `segue protect`."""

import sys

from segue_dist.protect.cli import main

sys.exit(main())
