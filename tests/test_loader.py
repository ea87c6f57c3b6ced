"""WebDataset loaders: one-pass coverage across ranks and workers, fixed-length deterministic training streams,
exact mid-epoch resume, bad samples, sidecar labels."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from segue_dist.data import loader as loader_mod
from segue_dist.data.images import BadImage
from segue_dist.data.loader import (
    OnePassStream,
    Record,
    ShardEnd,
    ShardSet,
    TrainStream,
    assign_shards,
    batches_per_epoch_for,
    decode_sample,
    iter_batches,
    iter_tar_samples,
    one_pass_loader,
    open_shard_set,
    train_loader,
)
from segue_dist.data.sidecar import read_sidecar, write_sidecar
from segue_dist.utils.io import atomic_write_json

NUM_CLASSES = 5


def png(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_shard_set(root: Path, sizes: list[int], bad: dict[int, list[int]] | None = None) -> ShardSet:
    """Shards of the given sizes; ``bad[shard]`` lists positions holding an undecodable image (still counted)."""
    bad = bad or {}
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"{s:05d}.tar"), encoder=False, mtime=0.0) as sink:
            for i in range(n):
                key = f"k{s:02d}_{i:03d}"
                image = b"\xff\xd8\xff garbage" if i in bad.get(s, []) else png(index)
                meta = json.dumps({"identity": f"id{index % NUM_CLASSES}", "source": key}).encode()
                sink.write({"__key__": key, "png": image, "cls": str(index % NUM_CLASSES).encode(), "json": meta})
                index += 1
    atomic_write_json(root / "sizes.json", {f"{s:05d}.tar": n for s, n in enumerate(sizes)})
    atomic_write_json(root / "labels.json", {"labels": {f"id{c}": c for c in range(NUM_CLASSES)}})
    return open_shard_set(root)


def start_ranks(fn, args: tuple, nprocs: int = 2) -> None:
    """torch.multiprocessing.spawn's API, but forked where the platform allows: a spawned child re-imports torch
    (5+ s on a busy 2-core machine), a forked one starts at once. Each rank is still its own process."""
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method=method)


def all_keys(shard_set: ShardSet) -> list[str]:
    return [raw["__key__"] for shard in shard_set.shards for raw in iter_tar_samples(shard)]


# --------------------------------------------------------------------------------------------------- shard sets


def test_open_shard_set_and_its_errors(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "ok", [3, 4])
    assert shard_set.num_samples == 7 and shard_set.num_classes == NUM_CLASSES
    assert [Path(s).name for s in shard_set.shards] == ["00000.tar", "00001.tar"]
    with pytest.raises(FileNotFoundError, match="not found"):
        open_shard_set(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar"):
        open_shard_set(tmp_path / "empty")
    make_shard_set(tmp_path / "nosizes", [2]).root.joinpath("sizes.json").unlink()
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        open_shard_set(tmp_path / "nosizes")
    make_shard_set(tmp_path / "extra", [2, 2])
    atomic_write_json(tmp_path / "extra" / "sizes.json", {"00000.tar": 2})
    with pytest.raises(ValueError, match="00001.tar"):
        open_shard_set(tmp_path / "extra")
    make_shard_set(tmp_path / "gone", [2, 2])
    (tmp_path / "gone" / "00001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing: 00001.tar"):
        open_shard_set(tmp_path / "gone")


def test_decode_sample_labels_sizes_and_errors() -> None:
    raw = {"__key__": "a", "png": png(0, (20, 30)), "cls": b"3", "json": b'{"identity": "x"}'}
    image, label, meta = decode_sample(raw, None, None)
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30) and label == 3 and meta == {"identity": "x"}
    image, _, _ = decode_sample(raw, (8, 12), None)
    assert image.shape == (3, 8, 12)
    assert decode_sample(raw, None, {"a": 1})[1] == 1  # a sidecar label replaces .cls
    with pytest.raises(BadImage, match="pseudo-label"):
        decode_sample(raw, None, {"b": 1})
    with pytest.raises(BadImage, match="cls"):
        decode_sample({**raw, "cls": b"x"}, None, None)
    with pytest.raises(BadImage, match="no image"):
        decode_sample({"__key__": "a", "cls": b"1"}, None, None)
    with pytest.raises(BadImage):
        decode_sample({**raw, "png": b"\x89PNG\r\n\x1a\n broken"}, None, None)


def test_truncated_shard_yields_what_it_can_then_an_error_record(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [6])
    tar = Path(shard_set.shards[0])
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    records = list(OnePassStream(list(shard_set.shards)))
    end = records[-1]
    assert isinstance(end, ShardEnd) and end.count == len(records) - 1
    good = [r for r in records[:-1] if r.error is None]
    assert 1 <= len(good) < 6
    assert any(r.error and "unreadable shard" in r.error for r in records[:-1])


# ----------------------------------------------------------------------------------------------------- one pass


def test_one_pass_single_process_every_sample_once(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [5, 3, 4], bad={1: [1]})
    records = list(OnePassStream(list(shard_set.shards), image_size=12))
    ends = [r for r in records if isinstance(r, ShardEnd)]
    samples = [r for r in records if isinstance(r, Record)]
    assert [e.count for e in ends] == [5, 3, 4]
    assert sorted(r.key for r in samples) == sorted(all_keys(shard_set))
    bad = [r for r in samples if r.error]
    assert [r.key for r in bad] == ["k01_001"] and bad[0].image is None and bad[0].meta["source"] == "k01_001"
    assert all(r.image.shape == (3, 12, 12) for r in samples if r.error is None)

    chunks = list(iter_batches(iter(records), batch_size=2))
    assert sum(len(g) for g, _, _ in chunks) == 11 and sum(len(b) for _, b, _ in chunks) == 1
    assert [e.shard for _, _, ends in chunks for e in ends] == list(shard_set.shards)
    assert all(len(g) <= 2 for g, _, _ in chunks)


def test_iter_batches_splits_on_image_size() -> None:
    def rec(key: str, side: int) -> Record:
        return Record(key, "s", torch.zeros(3, side, side, dtype=torch.uint8), 0, {})

    items = [rec("a", 8), rec("b", 8), rec("c", 9), ShardEnd("s", 3)]
    chunks = list(iter_batches(iter(items), batch_size=10))
    assert [[r.key for r in g] for g, _, _ in chunks] == [["a", "b"], ["c"]]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_one_pass_more_workers_than_shards(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [4, 3])
    stream = OnePassStream(list(shard_set.shards), decode=False)
    loader = one_pass_loader(stream, num_workers=4)
    assert loader.num_workers == 2
    keys = [r.key for r in loader if isinstance(r, Record)]
    assert Counter(keys) == Counter(all_keys(shard_set))
    # Even a loader built by hand with idle workers covers every sample exactly once.
    manual = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=3, collate_fn=loader_mod._no_collate)
    assert Counter(r.key for r in manual if isinstance(r, Record)) == Counter(all_keys(shard_set))


def test_contiguous_split_concatenates_to_the_single_process_order() -> None:
    from segue_dist.data.assign import contiguous_split

    names = [f"{i:05d}.tar" for i in range(7)]
    for world in (1, 2, 3, 4, 8):
        parts = [contiguous_split(names, r, world) for r in range(world)]
        assert [n for part in parts for n in part] == names  # rank order = the single-process order
    assert contiguous_split(names, 1, 2) == names[4:]  # blocks of ceil(7 / 2) = 4
    assert [len(contiguous_split(names, r, 3)) for r in range(3)] == [3, 3, 1]


def test_assign_shards_partitions() -> None:
    shards = [f"{i}.tar" for i in range(5)]
    parts = [assign_shards(shards, r, 2) for r in range(2)]
    assert parts == [["0.tar", "2.tar", "4.tar"], ["1.tar", "3.tar"]]
    assert assign_shards(shards[:1], 1, 2) == []


def _one_pass_rank(rank: int, world: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    from segue_dist.utils import dist

    shard_set = open_shard_set(root)
    mine = assign_shards(shard_set.shards, dist.rank(), dist.world_size())
    loader = one_pass_loader(OnePassStream(mine, image_size=16), num_workers=2)
    assert loader.num_workers == min(2, len(mine))
    keys, ends, bad = [], {}, []
    for item in loader:
        if isinstance(item, ShardEnd):
            ends[Path(item.shard).name] = item.count
        elif item.error:
            bad.append(item.key)
        else:
            assert item.image.shape == (3, 16, 16)
            keys.append(item.key)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"keys": keys, "ends": ends, "bad": bad}))


@pytest.mark.slow
def test_one_pass_two_ranks_cover_every_sample_once(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [4, 7, 2, 5, 3], bad={3: [0]})  # 5 shards: odd, uneven
    start_ranks(_one_pass_rank, (2, str(shard_set.root), str(tmp_path)))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    seen = results[0]["keys"] + results[1]["keys"] + results[0]["bad"] + results[1]["bad"]
    assert Counter(seen) == Counter(all_keys(shard_set))  # every sample, exactly once, across ranks
    assert set(results[0]["keys"]).isdisjoint(results[1]["keys"])
    assert results[1]["bad"] == ["k03_000"]
    assert results[0]["ends"] == {"00000.tar": 4, "00002.tar": 2, "00004.tar": 3}
    assert results[1]["ends"] == {"00001.tar": 7, "00003.tar": 5}


# ----------------------------------------------------------------------------------------------------- training


def batches(stream: TrainStream, num_workers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if num_workers == 0:
        return list(stream)
    return list(train_loader(stream, num_workers=num_workers, pin_memory=False))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and int(x[2]) == int(y[2])
        for x, y in zip(a, b, strict=True)
    )


def test_batches_per_epoch_for() -> None:
    assert batches_per_epoch_for(1000, 2, 16) == 31
    assert batches_per_epoch_for(10, 4, 16) == 1
    assert batches_per_epoch_for(1000, 2, 16, samples_per_epoch=320) == 10


def test_train_stream_deterministic_and_varies_with_epoch_and_rank(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [6, 9, 3, 7])

    def run(rank: int = 0, epoch: int = 0, seed: int = 0) -> list:
        stream = TrainStream(
            shard_set, batch_size=4, batches_per_epoch=5, rank=rank, world_size=2, seed=seed, shuffle_buffer=8
        )
        stream.set_epoch(epoch)
        return batches(stream)

    first = run()
    assert len(first) == 5
    for images, labels, skipped in first:
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
        assert labels.dtype == torch.long and int(labels.min()) >= 0 and int(labels.max()) < NUM_CLASSES
        assert int(skipped) == 0
    assert same(first, run())
    assert not same(first, run(epoch=1))
    assert not same(first, run(rank=1))
    assert not same(first, run(seed=1))


def test_train_stream_skip_batches_single_process(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [6, 9, 3, 7])
    stream = TrainStream(shard_set, batch_size=3, batches_per_epoch=7, seed=5, shuffle_buffer=10)
    stream.set_epoch(2)
    full = batches(stream)
    for n in (0, 1, 4, 6, 7):
        stream.set_epoch(2, skip_batches=n)
        assert same(batches(stream), full[n:]), n
    with pytest.raises(ValueError):
        stream.set_epoch(0, skip_batches=-1)


@pytest.mark.slow
def test_train_loader_workers_resume_exactly(tmp_path: Path) -> None:
    """With 2 loader workers, `set_epoch(e, skip_batches=n)` yields exactly batches n.. of the uninterrupted epoch."""
    shard_set = make_shard_set(tmp_path / "s", [6, 9, 3, 7])
    stream = TrainStream(shard_set, batch_size=3, batches_per_epoch=7, seed=5, shuffle_buffer=10)
    stream.set_epoch(1)
    full = batches(stream, num_workers=2)
    assert len(full) == 7
    assert same(full, batches(stream, num_workers=2))  # deterministic for (seed, rank, epoch, num_workers)
    for n in (1, 2, 3, 6):
        stream.set_epoch(1, skip_batches=n)
        assert same(batches(stream, num_workers=2), full[n:]), n
    stream.set_epoch(2)
    assert not same(batches(stream, num_workers=2), full)


def test_train_stream_skips_bad_samples_and_counts_them(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [5, 5], bad={0: [0, 2], 1: [4]})
    stream = TrainStream(shard_set, batch_size=4, batches_per_epoch=6, shuffle_buffer=4)
    out = batches(stream)
    assert len(out) == 6 and all(b[0].shape[0] == 4 for b in out)
    assert sum(int(b[2]) for b in out) > 0
    # A set with no decodable sample at all is an error, not a hang.
    hopeless = make_shard_set(tmp_path / "bad", [3], bad={0: [0, 1, 2]})
    with pytest.raises(RuntimeError, match="no decodable sample in any shard"):
        batches(TrainStream(hopeless, batch_size=2, batches_per_epoch=1))


def test_train_stream_empty_shards(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [0, 4, 0])
    out = batches(TrainStream(shard_set, batch_size=2, batches_per_epoch=3))
    assert len(out) == 3
    empty = make_shard_set(tmp_path / "e", [0, 0])
    with pytest.raises(RuntimeError, match="empty"):
        batches(TrainStream(empty, batch_size=2, batches_per_epoch=1))


def test_train_stream_small_set_big_buffer_starts_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shuffle buffer bigger than the set must not read the set many times over before the first batch."""
    shard_set = make_shard_set(tmp_path / "s", [5, 5, 5, 5])
    reads = Counter()
    real = loader_mod.iter_tar_samples

    def counting(url: str):
        reads[url] += 1
        yield from real(url)

    monkeypatch.setattr(loader_mod, "iter_tar_samples", counting)
    out = batches(TrainStream(shard_set, batch_size=4, batches_per_epoch=2, shuffle_buffer=10_000))
    assert len(out) == 2
    assert sum(reads.values()) <= 12, reads


def test_train_stream_samples_uniformly_across_uneven_shards(tmp_path: Path) -> None:
    """Each draw yields a whole shard, so shards are drawn uniformly: the lone sample of a 1-sample shard is seen as
    often as each sample of a 30-sample shard (drawing by shard size would show it 30 times less)."""
    shard_set = make_shard_set(tmp_path / "s", [1, 30])
    seen = Counter()
    stream = TrainStream(shard_set, batch_size=31, batches_per_epoch=30, shuffle_buffer=31)
    for images, _, _ in batches(stream):
        for image in images:
            seen[image.numpy().tobytes()[:16]] += 1
    lone = np.asarray(Image.open(io.BytesIO(png(0)))).transpose(2, 0, 1).tobytes()[:16]
    mean = sum(seen.values()) / len(seen)
    assert len(seen) == 31
    assert 0.4 * mean < seen[lone] < 2.5 * mean, (seen[lone], mean)


def test_train_stream_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar"), encoder=False) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "png": png(i, (16, 16 + i % 2)), "cls": b"0"})
    atomic_write_json(root / "sizes.json", {"00000.tar": 6})
    shard_set = open_shard_set(root)
    with pytest.raises(ValueError, match="image_size"):
        batches(TrainStream(shard_set, batch_size=6, batches_per_epoch=1, shuffle_buffer=6))
    out = batches(TrainStream(shard_set, batch_size=6, batches_per_epoch=1, image_size=(12, 10)))
    assert out[0][0].shape == (6, 3, 12, 10)


def test_sidecar_replaces_cls(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [4, 4])
    keys = all_keys(shard_set)
    pseudo = {key: (i * 7) % 3 for i, key in enumerate(keys)}
    write_sidecar(tmp_path / "pseudo_labels.json", pseudo, 3, feature_model_sha256="abc")
    labels, k = read_sidecar(tmp_path)  # a folder means its pseudo_labels.json
    assert labels == pseudo and k == 3
    records = [r for r in OnePassStream(list(shard_set.shards), label_map=labels) if isinstance(r, Record)]
    assert {r.key: r.label for r in records} == pseudo
    stream = TrainStream(shard_set, batch_size=8, batches_per_epoch=2, label_map=labels, shuffle_buffer=8)
    assert all(int(b[1].max()) < 3 for b in batches(stream))
    # A key the sidecar does not know is a bad sample, not a crash.
    partial = {k: v for k, v in pseudo.items() if k != keys[0]}
    records = [r for r in OnePassStream(list(shard_set.shards), label_map=partial) if isinstance(r, Record)]
    assert [r.key for r in records if r.error] == [keys[0]]


def test_sidecar_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_sidecar(tmp_path / "x.json", {"a": 3}, 3)
    with pytest.raises(FileNotFoundError):
        read_sidecar(tmp_path / "nope.json")
    for bad in ({"k": 2}, {"k": 2, "labels": {"a": 5}}, {"k": 2, "labels": [1]}, {"k": 2, "labels": {"a": 1.5}}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            read_sidecar(tmp_path / "bad.json")


def _train_rank(rank: int, world: int, root: str, out: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from segue_dist.utils.dist import init_if_launched

    assert init_if_launched("gloo")
    try:
        shard_set = open_shard_set(root)
        per_rank = batches_per_epoch_for(shard_set.num_samples, dist.get_world_size(), 4)
        stream = TrainStream(
            shard_set,
            batch_size=4,
            batches_per_epoch=per_rank,
            rank=dist.get_rank(),
            world_size=world,
            seed=3,
            shuffle_buffer=16,
        )
        result = {}
        for epoch in (0, 1):
            stream.set_epoch(epoch)
            got = list(train_loader(stream, num_workers=2, pin_memory=False))
            counts = [None] * world
            dist.all_gather_object(counts, len(got))
            digest = [None] * world
            dist.all_gather_object(digest, [b[1].tolist() for b in got])
            result[epoch] = {
                "counts": counts,
                "labels": digest,
                "per_rank": per_rank,
                "skipped": sum(int(b[2]) for b in got),
            }
        if rank == 0:
            Path(out, "train.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_training_two_ranks_same_batch_count_on_uneven_shards(tmp_path: Path) -> None:
    shard_set = make_shard_set(tmp_path / "s", [3, 11, 5, 1, 8, 2, 6], bad={1: [3]})  # 7 uneven shards, one bad sample
    with tempfile.TemporaryDirectory() as tmp:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        start_ranks(_train_rank, (2, str(shard_set.root), tmp, port))
        result = json.loads(Path(tmp, "train.json").read_text())
    for epoch in ("0", "1"):
        info = result[epoch]
        assert info["per_rank"] == 36 // (2 * 4)
        assert info["counts"] == [info["per_rank"]] * 2  # every rank the same number of batches: no DDP hang
        assert info["labels"][0] != info["labels"][1]  # ranks see different data
    assert result["0"]["labels"] != result["1"]["labels"]  # and a new epoch is a new stream
