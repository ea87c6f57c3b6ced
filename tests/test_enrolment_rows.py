"""The pretrained-recogniser attacker as sweep rows (victim ``dlib_enrolment``): planning, the missing-extra message,
the report table, and on a few real LFW identities: accuracy far above chance, a report row, reuse on a rerun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from segue_dist.attacks import AttackerConfig
from segue_dist.config import ConfigError
from segue_dist.evaluate import sweep as sweep_module
from segue_dist.evaluate.config import DataSpec, MethodSpec, SweepConfig, VictimConfig
from segue_dist.evaluate.sweep import plan_rows, run_sweep
from segue_dist.models import face_dlib
from segue_dist.models.face_dlib import dlib_available
from segue_dist.report.tables import enrolment_table, robustness_tables

needs_dlib = pytest.mark.skipif(not dlib_available(), reason=face_dlib.INSTALL_HINT)
# A few real identities: the first IDENTITIES LFW names (sorted) with >= 20 images, PER_IDENTITY photos each (TEST
# of them held out), at 64 px. 1-NN on clean dlib embeddings: far above chance (1 / IDENTITIES).
IDENTITIES, PER_IDENTITY, TEST = 6, 12, 3


def sweep_config(out: Path, clean: str = "c/train", test: str = "c/test") -> SweepConfig:
    return SweepConfig(
        name="enrol",
        out=str(out),
        data=DataSpec(dataset="lfw6", clean_train=clean, test=test),
        methods=[MethodSpec(name="clean"), MethodSpec(name="random", baseline="random")],
        victims=["dlib_enrolment"],
        attacks=[AttackerConfig(name="none"), AttackerConfig(name="jpeg10", jpeg_quality=10)],
        train=VictimConfig(size=64),
        quality=False,
    )


def test_enrolment_victim_gets_one_plain_row_per_method(tmp_path: Path) -> None:
    cfg = sweep_config(tmp_path)
    cfg.victims = ["resnet18", "dlib_enrolment"]
    names = [r.name for r in plan_rows(cfg)]
    assert names == [
        "clean__resnet18__none",
        "clean__resnet18__jpeg10",
        "clean__dlib_enrolment__none",
        "random__resnet18__none",
        "random__resnet18__jpeg10",
        "random__dlib_enrolment__none",
    ]
    with pytest.raises(ValueError, match="dlib_enrolment"):
        SweepConfig(name="x", data=DataSpec(dataset="d"), methods=[MethodSpec(name="clean")], victims=["dlib_knn"])


def test_missing_extra_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(face_dlib, "dlib_available", lambda: False)
    with pytest.raises(ConfigError, match=r"segue-dist\[faces\]") as err:
        run_sweep(sweep_config(tmp_path), show_progress=False)
    assert "\n" not in str(err.value)


def fake_row(method: str, victim: str, group: str, acc: float, **extra: Any) -> dict[str, Any]:
    tags = {"dataset": "d", "method": method, "victim": victim, "attack": "none", "group": group, "attack_config": {}}
    return {"kind": "victim", "name": f"{method}__{victim}__none", "tags": tags, "final_acc": acc, "chance": 25.0,
            "x_chance": acc / 25.0, **extra}  # fmt: skip


def test_enrolment_table_beside_the_trained_victim_and_not_a_robustness_group() -> None:
    scores = {"nearest_neighbour": 90.0, "class_mean": 91.0, "linear_probe": 89.0}
    rows = [
        fake_row("clean", "resnet18", "none", 80.0),
        fake_row("segue", "resnet18", "none", 26.0),
        fake_row("clean", "dlib_enrolment", "enrolment", 90.0, enrolment=scores),
        fake_row("segue", "dlib_enrolment", "enrolment", 90.0, enrolment=scores),
    ]
    table = enrolment_table(rows, "d")
    # The note compares the report's own clean and protected enrolment rows, never a fixed measurement.
    assert table is not None and "dlib_enrolment: clean 90.0% vs segue 90.0%" in table.note
    rows[3] = fake_row("segue", "dlib_enrolment", "enrolment", 41.5, enrolment=scores)
    assert "clean 90.0% vs segue 41.5%" in enrolment_table(rows, "d").note
    assert "in this report" not in enrolment_table(rows[:3], "d").note  # no protected row: nothing to compare
    assert [r[0] for r in table.rows] == ["clean", "segue"]
    assert table.rows[1][2:] == ["90.00", "91.00", "89.00", "25.00", "26.00 (1.0×)"]
    assert robustness_tables(rows, "d") == []  # the enrolment rows are not an attack family of the trained victim
    assert enrolment_table(rows[:2], "d") is None


@pytest.fixture(scope="module")
def lfw_split(faces_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segue_dist.shards import ShardsConfig, build_shards

    src = tmp_path_factory.mktemp("lfw6_src")
    names = [d for d in sorted((faces_root / "lfw423").iterdir()) if d.is_dir() and len(list(d.iterdir())) >= 20]
    for folder in names[:IDENTITIES]:
        (src / folder.name).mkdir()
        for path in sorted(folder.iterdir())[:PER_IDENTITY]:
            (src / folder.name / path.name).symlink_to(path)
    out = tmp_path_factory.mktemp("lfw6_64")
    build_shards(ShardsConfig(src=str(src), out=str(out), test_per_identity=TEST, size=[64]), show_progress=False)
    return out


@needs_dlib
@pytest.mark.realdata
def test_sweep_enrolment_rows_on_real_faces(lfw_split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound: on the project's 2-core AMD EPYC (AVX-512) dlib's nearest neighbour identified all 18 clean probes
    (100%, chance 16.7%), and all 18 again after ±8/255 random noise; dlib runs its own kernels, not torch's, and the
    60% bound leaves room for a worse draw of photos at 64 px."""
    from segue_dist.report.render import write_report

    cfg = sweep_config(tmp_path / "eval", str(lfw_split / "train"), str(lfw_split / "test"))
    rows = {r["name"]: r for r in run_sweep(cfg, show_progress=False)["rows"]}
    clean = rows["clean__dlib_enrolment__none"]
    assert clean["chance"] == pytest.approx(100 / IDENTITIES)
    assert clean["data"]["probe"]["samples"] == IDENTITIES * TEST
    # dlib's descriptor identifies clean LFW faces near-perfectly; 60% leaves room for a bad draw at 64 px.
    assert clean["final_acc"] >= 60.0, clean["enrolment"]
    assert set(clean["enrolment"]) == {"nearest_neighbour", "class_mean", "linear_probe"}
    assert rows["random__dlib_enrolment__none"]["final_acc"] >= 60.0  # ±8/255 noise does not move the embedding
    md, _ = write_report(tmp_path / "eval", tmp_path / "report")
    text = md.read_text()
    assert "enrolment by a pretrained face recogniser" in text and "| clean | dlib_enrolment |" in text

    def must_not_run(**_: Any) -> dict[str, Any]:
        raise AssertionError("a finished enrolment row was recomputed")

    monkeypatch.setattr(sweep_module, "run_enrolment", must_not_run)
    again = {r["name"]: r for r in run_sweep(cfg, show_progress=False)["rows"]}
    assert again["clean__dlib_enrolment__none"]["final_acc"] == clean["final_acc"]
