"""`python -m segue_dist.report --results D --out R`: the flags and errors of `segue report`."""

import sys

from segue_dist.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("report"))
