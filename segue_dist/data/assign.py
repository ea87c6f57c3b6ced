"""Which shards a rank reads: the project's two static shard-to-rank policies, and why there are two.

Both are pure functions of the sorted shard list, the rank and the world size, so no collectives are needed and
every rank (and every rerun) agrees on who owns which shard.

* :func:`assign_shards` (round-robin, shard i -> rank i % world): for jobs whose output is **per shard** (protect,
  one-pass loaders, feature extraction). Ranks get near-equal shard counts whatever the world size, and a rank's
  set does not depend on the others' progress, which is what lets a protect rerun skip finished shards safely.
* :func:`contiguous_split` (rank r takes the r-th contiguous block): for jobs whose result depends on the **order**
  of the concatenated rows (distributed K-means: concatenating ranks' rows in rank order must give the
  single-process order, so the distributed result equals the single-process one bit for bit). Round-robin would
  interleave shards and break that equality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def assign_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Round-robin: shard i goes to rank ``i % world_size``. Returns this rank's shards in list order (may be [])."""
    return list(shards[rank::world_size])


def contiguous_split(names: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank r takes the r-th block of ``ceil(len / world_size)`` names; ranks in order concatenate to ``names``."""
    per = math.ceil(len(names) / world_size)
    return list(names[rank * per : (rank + 1) * per])
