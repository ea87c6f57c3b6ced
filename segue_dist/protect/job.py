"""What both protect modes share: the job base (generator, ε, compute, settings check, warnings), the ordered-write
queue and the main thread's phase timer.

:class:`ProtectJob` loads G once and builds the one :class:`.perturber.Perturber` both modes run; shard mode
(:mod:`.shard_mode`) and folder mode (:mod:`.folder_mode`) add their input, their unit of work (a shard's size
buckets, a chunk of photos) and their records.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from segue_dist.protect.options import ProtectOptions, check_or_record_settings, delay_for_tests_s, resolve_batch_size
from segue_dist.protect.perturber import Perturber
from segue_dist.protect.quantise import eps_levels
from segue_dist.utils import dist
from segue_dist.utils.device import resolve_device
from segue_dist.utils.progress import console
from segue_dist.weights import generator_sha256, load_generator


def refuse_in_place(inp: Path, out: Path) -> None:
    """``ValueError`` when ``--out`` is ``--in``: protect never modifies its input."""
    if inp.resolve() == out.resolve():
        raise ValueError(f"--out must differ from --in ({inp}): protect never modifies its input")


def pause_for_tests(seconds: float) -> Callable[[], None]:
    """A callable that sleeps ``seconds`` (tests only: a window for ``kill -9`` after each unit of work written), or
    does nothing (``seconds`` <= 0, every real run)."""
    return (lambda: time.sleep(seconds)) if seconds > 0 else (lambda: None)


class PhaseTimer:
    """Seconds per phase (waiting for input, G, GPU codec, waiting for writes): where a slow job spends its time,
    reported in the summary. Thread-safe: phases run on pool threads (G on the CPU) are summed over the threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self.lock:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def timed_iter(items: Iterator[Any], timer: PhaseTimer, phase: str) -> Iterator[Any]:
    """``items`` with the time spent waiting for each one added to ``phase``."""
    while True:
        with timer(phase):
            item = next(items, None)
        if item is None:
            return
        yield item


class OrderedWrites:
    """Futures collected strictly in submission order, with a bound on how many may be outstanding.

    ``on_result(kind, value)`` runs on the caller's thread for each result in order. The bound is what keeps memory
    flat in the size of the corpus: :meth:`settle` blocks on the oldest future while more are outstanding.
    """

    def __init__(self, on_result: Callable[[str, Any], None], timer: PhaseTimer | None = None) -> None:
        self.pending: deque[tuple[str, Future]] = deque()
        self.on_result, self.timer = on_result, timer

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, kind: str, future: Future) -> None:
        self.pending.append((kind, future))

    def settle(self, limit: int) -> None:
        """Collect finished futures in order; block on the oldest while more than ``limit`` are outstanding."""
        while self.pending and (len(self.pending) > limit or self.pending[0][1].done()):
            kind, future = self.pending.popleft()
            with self.timer("wait_write") if self.timer else contextlib.nullcontext():
                value = future.result()
            self.on_result(kind, value)


class ProtectJob:
    """One rank's protect job, either mode: options, ranks, device, G and its :class:`Perturber`, ε in levels,
    G's hash, the batch size; the settings record / resume check (:meth:`record_settings`) and rank-0 warnings.

    Raises ``ValueError`` for ``--out`` equal to ``--in`` and whatever :func:`load_generator` raises for a bad
    generator file.
    """

    def __init__(self, opts: ProtectOptions) -> None:
        self.opts = opts
        self.rank, self.world = dist.rank(), dist.world_size()
        self.in_dir, self.out_dir = Path(opts.inp), Path(opts.out)
        refuse_in_place(self.in_dir, self.out_dir)
        self.device = resolve_device(opts.device)
        self.on_cuda = self.device.type == "cuda"
        self.generator, self.gen_meta = load_generator(opts.generator, self.device)
        self.gen_cfg = self.generator.config  # type: ignore[attr-defined]
        self.eps = float(self.gen_cfg.eps)
        self.eps_levels = eps_levels(self.eps)
        self.generator_sha = generator_sha256(opts.generator, self.gen_meta)
        self.batch_size = resolve_batch_size(opts, self.on_cuda)
        self.perturber = Perturber(self.generator, self.device, self.eps_levels, opts.precision)
        self.timer = PhaseTimer()
        # The tests' kill -9 window, injected into each mode's writer (never read inside a loop).
        self.pause = pause_for_tests(delay_for_tests_s())

    def record_settings(self, settings: dict[str, Any]) -> None:
        """Record what the output depends on (first run) or check it against the recorded run (resume): a
        ``ValueError`` for a change that would mix two protections, a warning for one that may flip roundings."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for message in check_or_record_settings(self.out_dir, settings):
            self.warn(message)

    def warn(self, message: str) -> None:
        if self.rank == 0:
            console.print(f"[yellow]warning:[/yellow] {message}")
