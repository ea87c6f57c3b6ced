"""`python -m segue_dist.site check|submit ...`: the flags and errors of `segue site`."""

import sys

from segue_dist.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("site"))
