"""Image-quality metrics: known values, invariants, scikit-image agreement, LPIPS from local weights."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from segue_dist.metrics import (
    LPIPS,
    MS_SSIM_MIN_SIDE,
    image_quality_per_image,
    linf,
    lpips,
    lpips_available,
    mae,
    ms_ssim,
    psnr,
    rmse,
    ssim,
)
from segue_dist.metrics import (
    quality_summary as image_quality,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Small tensors: intra-op threads only add OpenMP contention (100x slowdowns seen on a busy 2-core box).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + sigma * n).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------- PSNR
def test_psnr_constant_offset_is_20db() -> None:
    x = _rand(3, 3, 32, 40) * 0.9  # room for +0.1 without clipping
    out = psnr(x, x + 0.1)
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.full((3,), 20.0), atol=1e-3, rtol=0)


def test_psnr_data_range_and_identical_is_inf() -> None:
    x = _rand(2, 3, 16, 16)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    # Same relative error in 0..255 units gives the same PSNR.
    torch.testing.assert_close(psnr(x * 255, (x * 0.9) * 255, data_range=255.0), psnr(x, x * 0.9), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)


def test_summary_caps_psnr_of_identical_pairs() -> None:
    x = _rand(2, 3, 32, 32) * 0.9
    y = x.clone()
    y[1] += 0.1  # image 0 identical (inf), image 1 at 20 dB
    s = image_quality(x, y)
    assert s["psnr"] == pytest.approx((100.0 + 20.0) / 2, abs=1e-3)
    assert math.isinf(float(image_quality_per_image(x, y)["psnr"][0]))


# --------------------------------------------------------------------------------------------------- MAE / RMSE / Linf
def test_mae_rmse_linf_known_offsets() -> None:
    x = torch.full((3, 3, 8, 8), 0.5)
    offsets = torch.tensor([0.05, 0.1, -0.2])
    y = x + offsets.view(3, 1, 1, 1)
    torch.testing.assert_close(mae(x, y), offsets.abs(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rmse(x, y), offsets.abs(), atol=1e-6, rtol=0)
    torch.testing.assert_close(linf(x, y), offsets.abs(), atol=1e-6, rtol=0)
    # Half the pixels off by 0.2, half exact: MAE 0.1, RMSE sqrt(0.02), Linf 0.2.
    z = x.clone()
    z[:, :, :4] += 0.2
    torch.testing.assert_close(mae(x, z), torch.full((3,), 0.1), atol=1e-6, rtol=0)
    torch.testing.assert_close(rmse(x, z), torch.full((3,), math.sqrt(0.02)), atol=1e-6, rtol=0)
    torch.testing.assert_close(linf(x, z), torch.full((3,), 0.2), atol=1e-6, rtol=0)


def test_shape_and_dtype_checks() -> None:
    x = _rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="differ"):
        mae(x, x[:, :, :8])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        psnr(x[0], x[0])
    with pytest.raises(TypeError):
        rmse((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[:, :, :8, :8], x[:, :, :8, :8])


# ---------------------------------------------------------------------------------------------------------------- SSIM
def test_ssim_identity_symmetry_and_monotonicity() -> None:
    x = _rand(2, 3, 32, 48)
    torch.testing.assert_close(ssim(x, x), torch.ones(2), atol=1e-6, rtol=0)
    a, b = _noisy(x, 0.05), _noisy(x, 0.2)
    torch.testing.assert_close(ssim(x, a), ssim(a, x), atol=1e-6, rtol=0)
    assert (ssim(x, a) < 1).all() and (ssim(x, b) < ssim(x, a)).all()


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 40, 27), (2, 1, 24, 64)])
def test_ssim_matches_scikit_image(shape: tuple[int, ...]) -> None:
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (test extra)")
    x = _rand(*shape, seed=3)
    y = _noisy(x, 0.1, seed=4)
    ours = ssim(x, y)
    ref = [
        metrics.structural_similarity(
            x[i].double().numpy(),
            y[i].double().numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(shape[0])
    ]
    torch.testing.assert_close(ours.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_identity_and_noise() -> None:
    x = _rand(1, 3, MS_SSIM_MIN_SIDE, 170)  # odd side exercises the padded pooling
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(1), atol=1e-6, rtol=0)
    v1, v2, v3 = (ms_ssim(x, _noisy(x, s)) for s in (0.02, 0.1, 0.3))
    assert (v1 < 1).all() and (v2 < v1).all() and (v3 < v2).all()
    assert torch.isfinite(v3).all() and (v3 >= 0).all()


def test_ms_ssim_single_scale_is_ssim() -> None:
    x = _rand(2, 3, 24, 30)
    y = _noisy(x, 0.05)
    torch.testing.assert_close(ms_ssim(x, y, weights=(1.0,)), ssim(x, y), atol=1e-6, rtol=0)


def test_ms_ssim_small_image_raises_and_summary_omits_it() -> None:
    x = _rand(1, 3, MS_SSIM_MIN_SIDE - 1, 300)
    with pytest.raises(ValueError, match=str(MS_SSIM_MIN_SIDE)):
        ms_ssim(x, x)
    assert "ms_ssim" not in image_quality(x, _noisy(x, 0.05))
    big = _rand(1, 3, MS_SSIM_MIN_SIDE, MS_SSIM_MIN_SIDE)
    assert "ms_ssim" in image_quality(big, _noisy(big, 0.05))


def test_image_quality_keys_and_values() -> None:
    x = _rand(4, 3, 32, 32) * 0.9
    s = image_quality(x, x + 0.1)
    assert set(s) == {"psnr", "ssim", "mae", "rmse", "linf"}
    assert s["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert s["mae"] == pytest.approx(0.1, abs=1e-6) and s["rmse"] == pytest.approx(0.1, abs=1e-6)
    assert all(isinstance(v, float) for v in s.values())


# --------------------------------------------------------------------------------------------------------------- LPIPS
_ALEX_LIN_CHANNELS = (64, 192, 384, 256, 256)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Randomly initialised AlexNet features (no download) saved in the three accepted layouts, plus lin weights."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("lpips")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        feats = {k: v.clone() for k, v in LPIPS("alex").features.state_dict().items()}
        lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(_ALEX_LIN_CHANNELS)}
    paths = {
        "features_st": d / "alex_features.safetensors",
        "full_pt": d / "alexnet_full.pth",
        "lin": d / "alex_lin.pth",
    }
    save_file(feats, str(paths["features_st"]))
    full = {f"features.{k}": v for k, v in feats.items()}
    full["classifier.1.weight"] = torch.zeros(4, 4)  # a torchvision checkpoint carries a head; it must be tolerated
    torch.save(full, paths["full_pt"])
    torch.save(lin, paths["lin"])
    return paths


def test_lpips_uncalibrated_properties(lpips_files: dict[str, Path]) -> None:
    net = LPIPS.from_local(lpips_files["features_st"])
    assert net.calibrated is False and "calibrated=False" in repr(net)
    x = _rand(3, 3, 32, 32, seed=5)
    small, large = _noisy(x, 0.03, seed=6), _noisy(x, 0.2, seed=6)
    torch.testing.assert_close(lpips(x, x, net), torch.zeros(3), atol=1e-7, rtol=0)
    d_small = lpips(x, small, net)
    assert d_small.shape == (3,) and (d_small > 0).all()
    torch.testing.assert_close(d_small, lpips(small, x, net), atol=1e-6, rtol=1e-5)
    assert (lpips(x, large, net) > d_small).all()
    assert not any(p.requires_grad for p in net.parameters())


def test_lpips_calibrated_and_full_checkpoint_layout(lpips_files: dict[str, Path]) -> None:
    a = LPIPS.from_local(lpips_files["features_st"])
    b = LPIPS.from_local(lpips_files["full_pt"])  # features.* + classifier.* layout, torch.load(weights_only=True)
    x = _rand(2, 3, 48, 40, seed=7)
    y = _noisy(x, 0.1)
    torch.testing.assert_close(a(x, y), b(x, y))
    c = LPIPS.from_local(lpips_files["full_pt"], lpips_files["lin"])
    assert c.calibrated is True and "calibrated=True" in repr(c)
    assert not torch.allclose(c(x, y), a(x, y))  # lin weights in U(0,1) != uniform ones
    s = image_quality(x, y, lpips_model=c)
    assert s["lpips"] == pytest.approx(float(c(x, y).mean()), rel=1e-6)


def test_lpips_strict_loading(lpips_files: dict[str, Path], tmp_path: Path) -> None:
    feats = torch.load(lpips_files["full_pt"], weights_only=True)
    broken = dict(feats)
    broken.pop("features.0.weight")
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        LPIPS.from_local(tmp_path / "missing.pth")
    stray = dict(feats)
    stray["fc.weight"] = torch.zeros(1)
    torch.save(stray, tmp_path / "stray.pth")
    with pytest.raises(ValueError, match="unexpected keys"):
        LPIPS.from_local(tmp_path / "stray.pth")
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "lin_short.pth")
    with pytest.raises(ValueError, match="exactly"):
        LPIPS.from_local(lpips_files["features_st"], tmp_path / "lin_short.pth")
    with pytest.raises(FileNotFoundError):
        LPIPS.from_local(tmp_path / "nope.safetensors")


def test_lpips_input_checks(lpips_files: dict[str, Path]) -> None:
    net = LPIPS.from_local(lpips_files["features_st"])
    with pytest.raises(ValueError, match="at least 32"):
        net(_rand(1, 3, 16, 16), _rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="3-channel"):
        net(_rand(1, 1, 32, 32), _rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="net must be"):
        LPIPS("squeeze")  # type: ignore[arg-type]


def test_lpips_available_reasons(lpips_files: dict[str, Path], tmp_path: Path) -> None:
    ok, why = lpips_available(lpips_files["features_st"], lpips_files["lin"])
    assert ok and "calibrated" in why
    ok, why = lpips_available(lpips_files["features_st"])
    assert ok and "uncalibrated" in why
    ok, why = lpips_available(tmp_path / "absent.pth")
    assert not ok and "not found" in why and "absent.pth" in why
    ok, why = lpips_available(None)
    assert not ok and "no backbone" in why
    ok, why = lpips_available(lpips_files["features_st"], tmp_path / "absent_lin.pth")
    assert not ok and "lin weights not found" in why
    (tmp_path / "empty.pth").write_bytes(b"")
    ok, why = lpips_available(tmp_path / "empty.pth")
    assert not ok and "empty" in why
