"""Attacker harness: attacker transforms, image-quality plumbing, baseline writers, sweeps, report, real-data victims."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segue_dist import attacks
from segue_dist.attacks import AttackerConfig
from segue_dist.config import ConfigError, load_config
from segue_dist.evaluate import (
    BASELINE_METHODS,
    BaselineConfig,
    SweepConfig,
    VictimConfig,
    image_quality_between,
    load_image_set,
    mix_partial,
    run_sweep,
    run_victim,
    write_baseline,
)

REPO = Path(__file__).resolve().parents[1]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=_gen(seed))


# ------------------------------------------------------------------------------------------------ attacker transforms


def test_cutout_zeroes_two_half_size_patches_deterministically() -> None:
    x = _images() * 0.9 + 0.05  # no exact zeros before cutout
    out = attacks.cutout(x, _gen(1), holes=2, size_frac=0.5)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    zero = (out == 0).all(dim=1).float().mean(dim=(1, 2))
    # each 16x16 hole covers between a clipped corner (8x8) and 25% of a 32x32 image; two holes at most 50%
    assert ((zero >= 64 / 1024) & (zero <= 0.5)).all()
    assert torch.equal(out[out != 0], x[out != 0])
    assert torch.equal(out, attacks.cutout(x, _gen(1)))
    assert not torch.equal(out, attacks.cutout(x, _gen(2)))


def test_mixup_and_cutmix_mix_images_and_targets_consistently() -> None:
    x, y = _images(8), torch.arange(8) % 3
    mixed, targets = attacks.mixup(x, y, 3, _gen(0))
    assert mixed.shape == x.shape and mixed.min() >= 0 and mixed.max() <= 1
    assert torch.allclose(targets.sum(1), torch.ones(8))
    again, again_t = attacks.mixup(x, y, 3, _gen(0))
    assert torch.equal(mixed, again) and torch.equal(targets, again_t)

    cut, cut_t = attacks.cutmix(x, y, 3, _gen(3))
    assert torch.allclose(cut_t.sum(1), torch.ones(8))
    kept = (cut == x).all(dim=1).float().mean(dim=(1, 2))  # share of each image's own pixels
    own = (cut_t * F.one_hot(y, 3)).sum(1)
    # an image's own-label weight is at least its own pixel share (more when the pasted partner has the same label)
    assert (own >= kept - 1e-6).all()


def test_gaussian_blur_keeps_constants_smooths_noise_and_is_differentiable() -> None:
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(attacks.gaussian_blur(flat, 5, 1.0), flat, atol=1e-6)
    x = _images(2, 16, 16).requires_grad_(True)
    out = attacks.gaussian_blur(x, 5, 1.0)
    assert out.shape == x.shape and out.std() < x.std() / 2
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_grayscale_jpeg_iss_and_downscale() -> None:
    u8 = (_images(3, 32, 48) * 255).round().to(torch.uint8)
    gray = attacks.grayscale(u8)
    assert gray.dtype == torch.uint8 and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])

    q95, q10 = attacks.jpeg_compress(u8, 95), attacks.jpeg_compress(u8, 10)
    assert q10.shape == u8.shape and q10.dtype == torch.uint8
    err = lambda a: (a.float() - u8.float()).abs().mean()  # noqa: E731
    assert err(q10) > err(q95) > 0
    assert torch.equal(q10, attacks.jpeg_compress(u8, 10))  # a real codec, but a deterministic one

    iss = attacks.transform_images(u8, AttackerConfig(name="iss", iss=True), train=True)
    assert iss.dtype == torch.uint8 and iss.shape == u8.shape
    assert (iss[:, 0].int() - iss[:, 2].int()).abs().max() <= 2  # a JPEG of a gray image stays (nearly) gray

    small = attacks.downscale(u8, 16)
    assert small.shape == (3, 3, 16, 24) and small.dtype == torch.uint8  # aspect ratio kept
    checker = (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2
    board = checker.float().expand(1, 3, 32, 32).contiguous()
    assert (attacks.downscale(board, 8) - 0.5).abs().max() < 0.05  # antialiased: no aliasing of the checkerboard

    # JPEG is done to the scraped training data only; resolution and grayscale also apply to test images
    cfg = AttackerConfig(name="x", jpeg_quality=10, scale=0.5, grayscale=True)
    test = attacks.transform_images(u8, cfg, train=False)
    assert test.shape[-2:] == (16, 24) and torch.equal(test, attacks.downscale(attacks.grayscale(u8), 16))


def test_flip_crop_and_batch_transform_are_seeded() -> None:
    x, y = _images(6), torch.arange(6) % 2
    for augment in attacks.AUGMENTS:
        cfg = AttackerConfig(name=augment, augment=augment)
        a, ta = attacks.train_batch_transform(x, y, 2, cfg, _gen(5))
        b, tb = attacks.train_batch_transform(x, y, 2, cfg, _gen(5))
        assert a.shape == x.shape and ta.shape == (6, 2) and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_select_protected_is_exact_nested_and_order_free() -> None:
    keys = [f"{i:05d}" for i in range(101)]
    half = attacks.select_protected(keys, 0.5, seed=0)
    assert sum(half) == 50
    assert half == attacks.select_protected(keys, 0.5, seed=0)
    shuffled = keys[::-1]
    chosen = {k for k, c in zip(keys, half, strict=True) if c}
    assert chosen == {k for k, c in zip(shuffled, attacks.select_protected(shuffled, 0.5, 0), strict=True) if c}
    more = attacks.select_protected(keys, 0.8, seed=0)
    assert all(m for h, m in zip(half, more, strict=True) if h)


def test_pgd_stays_in_the_ball_raises_the_loss_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(_images(2, 16, 16))
    model.train()
    x, y, rho = _images(8, 16, 16), torch.arange(8) % 3, 4 / 255
    adv = attacks.pgd_linf(model, x, y, rho=rho, steps=5, generator=_gen(0))
    assert (adv - x).abs().max() <= rho + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert model.training
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    assert torch.equal(adv, attacks.pgd_linf(model, x, y, rho=rho, steps=5, generator=_gen(0)))


def test_attacker_config_validation_and_groups() -> None:
    with pytest.raises(ValueError, match="augment"):
        AttackerConfig(augment="rotate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iss"):
        AttackerConfig(iss=True, jpeg_quality=50)
    with pytest.raises(ValueError, match="jpeg_quality"):
        AttackerConfig(jpeg_quality=101)
    assert AttackerConfig().group == "none"
    assert AttackerConfig(adv_rho=2 / 255).group == "adversarial"
    assert AttackerConfig(scale=0.5).group == "resolution"
    assert AttackerConfig(augment="mixup", jpeg_quality=50).group == "combined"
    assert AttackerConfig(adv_rho=0.04, adv_steps=4).step_size == pytest.approx(0.025)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_load(path: Path) -> None:
    cfg = load_config(SweepConfig, path, ["train.epochs=2"])
    assert cfg.methods and cfg.victims and cfg.attacks and cfg.train.epochs == 2


def test_sweep_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config(SweepConfig, None, ["name=x", "data.dataset=d", "methods=[{name: clean}]", "train.epoch=3"])
    with pytest.raises(ConfigError, match="needs `train`"):
        load_config(SweepConfig, None, ["name=x", "data.dataset=d", "methods=[{name: segue}]"])
    with pytest.raises(ConfigError, match="unknown victim"):
        load_config(SweepConfig, None, ["name=x", "data.dataset=d", "methods=[{name: clean}]", "victims=[vgg]"])


# --------------------------------------------------------------------------------------------- shard-set fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic identities: 4 x 12 images at 32 px, 3 test images each, 10 samples per shard (several shards)."""
    from segue_dist.demo import write_demo_corpus
    from segue_dist.shards import ShardsConfig, build_shards

    root = tmp_path_factory.mktemp("tiny")
    write_demo_corpus(root / "corpus", identities=4, per_identity=12, size=32, seed=0)
    cfg = ShardsConfig(
        src=str(root / "corpus"), out=str(root / "shards"), test_per_identity=3, samples_per_shard=10, workers=1
    )
    build_shards(cfg, show_progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def separable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An easy set: 4 classes of flat colour (red, green, blue, yellow) with ±25 levels of pixel noise, 16 + 4
    images each at 32 px. Any working victim loop learns it in a few epochs (measured 100% after 3, chance 25%); a
    loop that does not step, mixes up labels or tests on the wrong images stays near chance."""
    from segue_dist.shards import ShardsConfig, build_shards

    root = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)
    for label, colour in enumerate([(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 220, 50)]):
        folder = root / "src" / f"id{label}"
        folder.mkdir(parents=True)
        for i in range(20):
            noise = rng.integers(-25, 26, (32, 32, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    cfg = ShardsConfig(
        src=str(root / "src"), out=str(root / "shards"), test_per_identity=4, samples_per_shard=16, workers=1
    )
    build_shards(cfg, show_progress=False)
    return root / "shards"


def _members(split: Path) -> dict[str, list[str]]:
    out = {}
    for tar in sorted(split.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out[tar.name] = [m.name for m in tf.getmembers()]
    return out


def _fast_victim(**kw: object) -> VictimConfig:
    return VictimConfig(**{"epochs": 1, "batch_size": 16, "small_stem": False, "workers": 0, **kw})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- baselines, quality


def test_baseline_at_an_eps_off_the_255_grid_passes_its_own_check(tiny: Path, tmp_path: Path) -> None:
    """ε = 0.03 is 7.65 levels: the bound is 7 (never above ε). Rounding alone (the baseline writer's old
    quantisation) reaches 8 levels and the writer's own check refused the set; the integer clamp keeps it at 7."""
    out = tmp_path / "random003" / "train"
    cfg = BaselineConfig(method="random", in_dir=str(tiny / "train"), out_dir=str(out), eps=0.03, device="cpu")
    stats = write_baseline(cfg, show_progress=False)
    assert stats["check"]["eps_255"] == 7 and stats["check"]["linf_255"] == 7  # the noise reaches the bound
    clean, protected = load_image_set(tiny / "train"), load_image_set(out)
    assert int((protected.images.int() - clean.images.int()).abs().max()) == 7


@pytest.mark.parametrize("method", list(BASELINE_METHODS))
def test_baseline_writer_respects_eps_and_keeps_the_layout(method: str, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / method / "train"
    options = {"max_rounds": 1, "train_steps": 1, "pgd_steps": 1, "batch_size": 16} if method.startswith("ue") else {}
    cfg = BaselineConfig(
        method=method,
        in_dir=str(tiny / "train"),
        out_dir=str(out),
        eps=8 / 255,
        surrogate_small_stem=False,
        device="cpu",
        options=options,
    )
    stats = write_baseline(cfg, show_progress=False)
    assert stats["check"]["linf_255"] <= 8 and stats["check"]["mae_255"] > 0
    assert stats["generation_s"] > 0 and stats["samples"] == 36
    clean = load_image_set(tiny / "train", keep_meta=True)
    protected = load_image_set(out, keep_meta=True)
    assert protected.keys == clean.keys and torch.equal(protected.labels, clean.labels)
    assert protected.shards == clean.shards and protected.positions == clean.positions
    assert protected.extras == clean.extras  # .cls and .json byte for byte
    assert (protected.images.int() - clean.images.int()).abs().max() <= 8  # ε on the written uint8 images
    assert json.loads((out / "sizes.json").read_text()) == json.loads((tiny / "train" / "sizes.json").read_text())
    written, source = _members(out), _members(tiny / "train")
    assert {shard: sorted(n.replace(".png", ".jpg") for n in names) for shard, names in written.items()} == {
        shard: sorted(names) for shard, names in source.items()
    }


def test_image_quality_pairs_by_key(tiny: Path, tmp_path: Path) -> None:
    same = image_quality_between(str(tiny / "train"), str(tiny / "train"))
    assert same["counts"] == {"pairs": 36, "unpaired": 0, "resized": 0}
    assert (
        same["metrics"]["linf"] == 0 and same["metrics"]["psnr"] == 100 and same["metrics"]["ssim"] == pytest.approx(1)
    )
    assert "ms_ssim" in same["notes"]  # 32 px images: MS-SSIM needs 161 px and is skipped with a reason
    out = tmp_path / "random"
    write_baseline(
        BaselineConfig(method="random", in_dir=str(tiny / "train"), out_dir=str(out), device="cpu"), show_progress=False
    )
    q = image_quality_between(str(tiny / "train"), str(out))
    assert q["metrics"]["linf_255"] <= 8 and 25 < q["metrics"]["psnr"] < 60 and q["metrics"]["ssim"] < 1
    assert q["metrics"]["mae"] < 8 / 255 and q["metrics"]["rmse"] >= q["metrics"]["mae"]


def test_image_quality_of_a_baseline_made_at_another_size(tiny: Path, tmp_path: Path) -> None:
    """A sweep makes baselines at the victims' size (README: 32 px from 64 px shards): their quality is measured
    against the clean image resized as the loaders resize it, the image the baseline started from."""
    out = tmp_path / "random16"
    write_baseline(
        BaselineConfig(method="random", in_dir=str(tiny / "train"), out_dir=str(out), size=16, device="cpu"),
        show_progress=False,
    )
    q = image_quality_between(str(tiny / "train"), str(out))
    assert q["counts"] == {"pairs": 36, "unpaired": 0, "resized": 36} and "size" in q["notes"]
    # ε holds against the resized source: a different resize (or none) would show as far more than 8 levels
    assert q["metrics"]["linf_255"] <= 8 and 25 < q["metrics"]["psnr"] < 60


def test_quality_lpips_from_local_weights_only(tiny: Path, tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    from segue_dist.evaluate import run_quality

    skipped = run_quality(str(tiny / "train"), str(tiny / "train"))
    assert "lpips" not in skipped["metrics"] and skipped["notes"]["lpips"].startswith("skipped: no local LPIPS weights")
    with pytest.raises(FileNotFoundError, match="not found"):
        run_quality(str(tiny / "train"), str(tiny / "train"), lpips_weights=str(tmp_path / "missing.pth"))
    weights = tmp_path / "alexnet_features.safetensors"  # random init: checks the plumbing, not LPIPS values
    save_file(
        {k: v.contiguous() for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}, weights
    )
    same = run_quality(str(tiny / "train"), str(tiny / "train"), lpips_weights=str(weights))
    assert same["metrics"]["lpips"] == pytest.approx(0.0, abs=1e-6) and "uncalibrated" in same["notes"]["lpips"]


def test_partial_protection_mixes_by_key(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "lsp"
    write_baseline(
        BaselineConfig(method="lsp", in_dir=str(tiny / "train"), out_dir=str(out), device="cpu"), show_progress=False
    )
    clean, protected = load_image_set(tiny / "train"), load_image_set(out)
    mixed, n = mix_partial(protected, clean, 0.25, seed=0)
    assert n == 9
    from_protected = [
        torch.equal(m, p) and not torch.equal(m, c)
        for m, p, c in zip(mixed.images, protected.images, clean.images, strict=True)
    ]
    assert sum(from_protected) == 9


# ------------------------------------------------------------------------------------------------ sweep and report


def test_sweep_resumes_and_report_renders(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [
        "name=tiny",
        f"out={tmp_path / 'eval'}",
        "device=cpu",
        f"data={{dataset: tiny, clean_train: {tiny / 'train'}, test: {tiny / 'test'}}}",
        "methods=[{name: clean}, {name: random-classwise, baseline: random-classwise}]",
        "attacks=[{name: none}, {name: jpeg50, jpeg_quality: 50}, {name: jpeg10, jpeg_quality: 10}]",
        "train={epochs: 1, batch_size: 16, small_stem: false, workers: 0}",
    ]
    cfg = load_config(SweepConfig, None, overrides)
    combined = run_sweep(cfg, show_progress=False)
    assert len(combined["rows"]) == 6 and (tmp_path / "eval" / "results.json").is_file()
    row = combined["rows"][0]
    assert row["chance"] == pytest.approx(25.0) and row["x_chance"] == pytest.approx(row["final_acc"] / 25.0)
    assert len(row["epochs"]) == 1 and row["config"]["train"]["epochs"] == 1
    assert combined["quality"]["random-classwise"]["metrics"]["linf_255"] <= 8

    def no_training(*args: object, **kw: object) -> None:
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr("segue_dist.evaluate.victim.train_victim", no_training)
    again = run_sweep(cfg, show_progress=False)
    assert [r["final_acc"] for r in again["rows"]] == [r["final_acc"] for r in combined["rows"]]

    from segue_dist.report import write_report

    md, page = write_report(tmp_path / "eval", tmp_path / "report", samples=3)
    text = md.read_text()
    for heading in (
        "Effectiveness",
        "Robustness",
        "Image quality",
        "Time to protect",
        "JPEG quality curve",
        "Protected examples",
    ):
        assert heading in text
    assert "data:image/png;base64," in page.read_text()
    grid = Image.open(tmp_path / "report" / "figures" / "grid_tiny.png")
    # A 120 px label column, then 3 samples as columns; rows: clean | protected | residual; 112 px cells, 4 px gaps.
    assert grid.size == (120 + 3 * 116 + 4, 3 * 116 + 4)
    label_column = np.asarray(grid.convert("L"))[:, :116]
    assert (label_column < 128).any(axis=1).sum() > 20  # the row labels are drawn (dark text on white)
    assert Image.open(next((tmp_path / "report" / "figures").glob("jpeg_tiny.*"))).size[0] > 100


def test_stream_mode_trains_from_the_webdataset_stream(separable: Path) -> None:
    """Bound: 100% measured on the project's 2-core AMD EPYC (AVX-512 kernels) on this easy 4-class set; 75% (3x
    chance) leaves a quarter for another CPU's rounding or a worse shuffle."""
    attack = AttackerConfig(name="q50", jpeg_quality=50, scale=0.5)  # data transforms applied per streamed batch
    train, test = str(separable / "train"), str(separable / "test")
    common = {"arch": "resnet18", "train_dir": train, "test_dir": test, "attack": attack}
    result = run_victim(
        cfg=_fast_victim(mode="stream", epochs=3),
        tags={"method": "clean"},
        device=torch.device("cpu"),
        show_progress=False,
        **common,
    )  # type: ignore[arg-type]
    assert result["data"]["mode"] == "stream" and result["data"]["test_samples"] == 16
    assert result["image_size"] == [16, 16]
    # Learned from the stream: far above chance (25%) on the easy set; measured 100%.
    assert result["final_acc"] >= 75.0 and result["x_chance"] >= 3.0


def test_time_table_reads_protect_stats_and_svg_fallback(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from segue_dist.report import Results, _jpeg_svg, time_table

    segue = tmp_path / "protected"
    segue.mkdir()
    (segue / "_manifest.json").write_text("{}")
    (segue / "00000._stats.json").write_text(json.dumps({"seconds": 1.5, "written": 10}))
    (segue / "00001._stats.json").write_text(json.dumps({"seconds": 0.5, "written": 5}))
    (segue / "_protect.json").write_text(json.dumps({"compute": "cpu-fp32-per-image"}))
    results = Results(
        baselines=[{"method": "ue", "samples": 15, "generation_s": 30.0, "device": "cpu"}],
        sweeps=[
            {
                "methods": {
                    "segue": {"train": str(segue), "baseline": ""},
                    "clean": {"train": str(tmp_path), "baseline": ""},
                }
            }
        ],
    )
    table = time_table(results)
    assert table is not None and table.rows == [
        ["ue", "15", "30.00", "2000.00", "cpu"],
        ["segue", "15", "2.00", "133.33", "cpu-fp32-per-image"],
    ]
    curves = {"segue": [(10, 5.0), (90, 4.0)], "clean": [(10, 40.0), (90, 50.0)], "lsp": [(10, 20.0), (90, 6.0)]}
    svg = _jpeg_svg(curves, 4.2, "JPEG <test>", none={"clean": 55.0, "segue": 3.0})
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and svg.count("<polyline") == 3
    assert ">none<" in svg and svg.count('class="none-point"') == 2  # no-attack points of the two methods that have one
    lines = [e for e in root.iter() if e.tag.endswith("polyline")]
    # Segue is drawn last (on top), thicker, in a colour no other line has.
    assert float(lines[-1].get("stroke-width")) > max(float(e.get("stroke-width")) for e in lines[:-1])
    assert lines[-1].get("stroke") not in {e.get("stroke") for e in lines[:-1]}


def test_residual_tile_keeps_sign_and_levels_without_saturating() -> None:
    from segue_dist.report import residual_tile

    clean = torch.full((3, 3, 3), 128, dtype=torch.uint8)
    delta = torch.arange(-4, 5, dtype=torch.int16).view(1, 3, 3).expand(3, 3, 3)  # -4/255 .. +4/255
    tile = residual_tile((clean.short() + delta).to(torch.uint8), clean).short()
    assert len(tile.unique()) == 9  # one grey level per δ value (a gain of 30 on |δ|: 5)
    assert int(tile[0, 1, 1]) == 128 and int(tile[0, 0, 0]) == 0 and int(tile[0, 2, 2]) == 255  # 0 mid-grey, ± ends
    inner = delta.abs() < 4
    assert ((tile[inner] > 0) & (tile[inner] < 255)).all()  # only the largest |δ| reaches the ends
    assert (tile[delta > 0] > 128).all() and (tile[delta < 0] < 128).all()  # the sign is visible
    assert (residual_tile(clean, clean) == 128).all()  # no perturbation: flat grey, no division by zero


def test_goals_table_holds_segue_rows_to_the_targets() -> None:
    from segue_dist.report import goals_table

    def row(method: str, attack: str, group: str, x: float, **config: object) -> dict:
        tags = {"method": method, "victim": "resnet18", "dataset": "d", "attack": attack, "group": group}
        return {"tags": {**tags, "attack_config": config}, "final_acc": 4.0 * x, "x_chance": x}

    victims = [
        row("segue", "none", "none", 1.1),
        row("segue", "jpeg10", "jpeg", 2.0, jpeg_quality=10),
        row("segue", "adv8", "adversarial", 1.0, adv_rho=8 / 255),  # stronger than the goals name: no goal
        row("segue", "cutout", "augment", 1.0, augment="cutout"),  # not named by the goals
        row("lsp", "none", "none", 1.0),  # baselines are not held to Segue's goals
    ]
    table = goals_table(victims)
    assert table is not None
    assert [(r[2], r[4], r[5]) for r in table.rows] == [("none", "≤ 1.2×", "yes"), ("jpeg10", "≤ 1.5×", "**no**")]


def test_report_from_a_sweep_file_alone_keeps_its_quality(tmp_path: Path) -> None:
    from segue_dist.report import collect, quality_table

    record = {"kind": "quality", "clean": "a", "protected": "b", "method": "segue", "metrics": {"psnr": 31.0}}
    (tmp_path / "results.json").write_text(json.dumps({"kind": "sweep", "rows": [], "quality": {"segue": record}}))
    (tmp_path / "quality.json").write_text(json.dumps(record))  # the same pair measured twice counts once
    results = collect(tmp_path)
    table = quality_table(results.quality)
    assert len(results.quality) == 1 and table is not None and table.rows[0][1] == "31"


def test_cli_victim_and_clear_errors(
    separable: Path, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bound: the victim measured 100% on the project's 2-core AMD EPYC (AVX-512 kernels) on the easy 4-class set;
    75% leaves a quarter of margin."""
    from segue_dist.cli import main

    out = tmp_path / "victim"
    args = [
        "evaluate",
        "victim",
        "--train",
        str(separable / "train"),
        "--test",
        str(separable / "test"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main([*args, "train.epochs=3", "train.small_stem=false", "train.workers=0", "train.batch_size=16"]) == 0
    result = json.loads((out / "protected__resnet18__none.json").read_text())
    assert result["kind"] == "victim" and result["chance"] == 25.0
    # The CLI trained a real victim: far above chance on the easy set (measured 100%), 3 epochs recorded.
    assert result["final_acc"] >= 75.0 and len(result["epochs"]) == 3

    assert main(["evaluate", "victim", "--train", str(tmp_path / "nope"), "--test", str(tiny / "test")]) == 2
    assert "shard folder not found" in capsys.readouterr().err
    assert main([*args, "attack.jpeg_quality=150"]) == 2
    assert "jpeg_quality" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.realdata
def test_glint24_victim_learns_clean_and_not_protected(faces_root: Path, tmp_path: Path) -> None:
    """glint24 at 32 px (24 identities, chance 4.2%): ResNet-18 learns the clean set, not a class-wise shortcut set.

    Class-wise LSP at 16/255 is the strong, cheap shortcut here. At 8/255 the victim still reaches about half its clean
    accuracy (26% vs 50%), and class-wise uniform noise does nothing (46%): the victim's flip + crop shifts a
    pixel-level pattern off its place, while LSP's 8 px patches survive it.

    Bound: clean 50.0% and protected 12.1% on the project's 2-core AMD EPYC (AVX-512 kernels); the bounds (clean above
    5x chance, 20.8%; protected below half the clean victim) leave about 29 and 13 points.
    """
    from segue_dist.shards import ShardsConfig, build_shards

    shards = tmp_path / "glint24"
    build_shards(
        ShardsConfig(
            src=str(faces_root / "glint24"), out=str(shards), test_per_identity=10, size=[32], samples_per_shard=500
        ),
        show_progress=False,
    )
    protected = tmp_path / "protected" / "train"
    baseline = BaselineConfig(
        method="lsp-classwise", in_dir=str(shards / "train"), out_dir=str(protected), eps=16 / 255, device="cpu"
    )
    assert write_baseline(baseline, show_progress=False)["check"]["linf_255"] <= 16
    cfg = _fast_victim(epochs=6, batch_size=64)
    common = {
        "arch": "resnet18",
        "test_dir": str(shards / "test"),
        "cfg": cfg,
        "attack": AttackerConfig(),
        "device": torch.device("cpu"),
        "show_progress": False,
    }
    clean = run_victim(train_dir=str(shards / "train"), tags={"method": "clean"}, **common)  # type: ignore[arg-type]
    prot = run_victim(train_dir=str(protected), tags={"method": "lsp-classwise"}, **common)  # type: ignore[arg-type]
    print(
        f"glint24 32px resnet18 {cfg.epochs} epochs: clean {clean['final_acc']:.1f}%, protected {prot['final_acc']:.1f}%, chance {clean['chance']:.1f}%"
    )
    assert clean["chance"] == pytest.approx(100 / 24) and clean["data"]["train_samples"] == 2019
    assert clean["final_acc"] > 5 * clean["chance"]  # measured: 50.0%
    assert prot["final_acc"] < clean["final_acc"] / 2  # measured: 12.1%
