#!/bin/bash
# Submit one pipeline stage to a site, with its resources and environment read from the site file:
#
#   launch/submit.sh configs/sites/<site>.yaml <stage> [--dry-run] [--set key=value ...] [--] [stage args ...]
#   stages: shards | cluster | train | protect | evaluate
#
# Slurm sites: renders launch/slurm/<stage>.sbatch with the site's #SBATCH lines, writes it to the site's logs folder
# and runs sbatch on it (--dry-run prints the script instead). Local sites: runs the stage here, one launcher per
# node. Same as `segue site submit ...`; this wrapper only finds a Python that has segue_dist.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${SEGUE_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then
        python="$repo/.venv/bin/python"
    else
        python=python3
    fi
fi
exec "$python" -m segue_dist.cli site submit "$@"
