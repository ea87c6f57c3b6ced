"""Distortion layer: differentiability, shapes, ranges, PGD, flips, JPEG fidelity against PIL, reproducibility."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from segue_dist.distortion import (
    DistortionConfig,
    DistortionLayer,
    adjust_sharpness,
    gaussian_blur,
    jpeg_compress_differentiable,
    jpeg_quant_tables,
    pgd_perturbation,
    rescale_down_up,
)

RHO = 1 / 255
ALL_OFF = {
    "pgd": False,
    "blur": False,
    "sharpness": False,
    "jpeg": False,
    "rescale": False,
    "hflip_p": 0.0,
    "vflip_p": 0.0,
}


def natural_image(height: int = 72, width: int = 88, seed: int = 0) -> torch.Tensor:
    """A smooth gradient with flat discs and mild noise, quantised to 8 bits: (3, H, W) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.3 * torch.sin(6 * xx + 4 * yy)])
    for cy, cx, radius, colour in [
        (0.3, 0.3, 0.18, (0.9, 0.1, 0.1)),
        (0.65, 0.7, 0.22, (0.1, 0.2, 0.8)),
        (0.5, 0.5, 0.1, (0.95, 0.95, 0.2)),
    ]:
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        for c in range(3):
            img[c][disc] = colour[c]
    img = img + 0.03 * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round() / 255


def pil_jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1).float() / 255


class TinyNet(nn.Module):
    """Small surrogate with BatchNorm and Dropout so the train/eval handling of PGD is observable."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x).mean(dim=(2, 3))))


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("jpeg_quality", (0, 50)),
        ("jpeg_quality", (10, 101)),
        ("jpeg_quality", (60, 50)),
        ("jpeg_quality", (10,)),
        ("jpeg_quality", (10.5, 50)),
        ("rescale_range", (0.0, 1.0)),
        ("rescale_range", (0.5, 1.5)),
        ("rescale_range", (0.8, 0.5)),
        ("pgd_radius", -0.1),
        ("pgd_steps", 0),
        ("blur_kernel", 4),
        ("blur_sigma", 0.0),
        ("sharpness_factor", -1.0),
        ("hflip_p", 1.5),
        ("vflip_p", -0.1),
        ("jpeg_p", 2.0),
        ("rescale_p", -1.0),
        ("blur_p", 1.1),
        ("sharpness_p", 7),
        ("mode", "all"),
        ("jpeg_rounding", "floor"),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistortionConfig(**{field: value})


def test_config_normalises_lists_from_yaml():
    cfg = DistortionConfig(jpeg_quality=[20, 80], rescale_range=[0.5, 1])
    assert cfg.jpeg_quality == (20, 80)
    assert cfg.rescale_range == (0.5, 1.0)


# ----------------------------------------------------------------------------------------------- ops


OPS = {
    "blur": lambda t: gaussian_blur(t, 3, 0.2),
    "blur_wide": lambda t: gaussian_blur(t, 5, 1.5),
    "sharpness": lambda t: adjust_sharpness(t, 2.0),
    "rescale": lambda t: rescale_down_up(t, 0.3),
    "jpeg_cubic_st": lambda t: jpeg_compress_differentiable(t, 10),
    "jpeg_cubic": lambda t: jpeg_compress_differentiable(t, 10, rounding="cubic"),
    "jpeg_ste": lambda t: jpeg_compress_differentiable(t, 30, rounding="ste", chroma_subsampling=False),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("size", [(50, 37), (48, 40)])
def test_op_is_differentiable_and_keeps_shape(name, size):
    x = (0.1 + 0.8 * torch.rand(2, 3, *size)).requires_grad_(True)
    y = OPS[name](x)
    assert y.shape == x.shape
    assert float(y.detach().min()) >= 0.0 and float(y.detach().max()) <= 1.0
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert float(x.grad.abs().mean()) > 1e-3


def test_blur_and_sharpness_match_torchvision():
    x = torch.rand(2, 3, 30, 41)
    torch.testing.assert_close(gaussian_blur(x, 3, 0.2), TF.gaussian_blur(x, [3, 3], [0.2, 0.2]))
    torch.testing.assert_close(gaussian_blur(x, 5, 1.3), TF.gaussian_blur(x, [5, 5], [1.3, 1.3]))
    torch.testing.assert_close(adjust_sharpness(x, 2.0), TF.adjust_sharpness(x, 2.0))
    torch.testing.assert_close(adjust_sharpness(x, 0.3), TF.adjust_sharpness(x, 0.3))


def test_rescale_removes_fine_detail():
    x = torch.rand(1, 3, 64, 64)
    assert float((rescale_down_up(x, 0.25) - x).abs().mean()) > 0.1
    assert torch.equal(rescale_down_up(x, 1.0), x)


# ----------------------------------------------------------------------------------------------- JPEG


@pytest.mark.parametrize("quality", [1, 10, 25, 50, 75, 90, 100])
def test_quant_tables_match_pil(quality):
    arr = (natural_image(16, 16).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    tables = Image.open(buf).quantization
    luma, chroma = jpeg_quant_tables(quality)
    assert luma[0].flatten().tolist() == list(tables[0])
    assert chroma[0].flatten().tolist() == list(tables[1])


@pytest.mark.parametrize("quality", [10, 50, 90])
@pytest.mark.parametrize(("height", "width", "seed"), [(72, 88, 0), (50, 37, 1)])
def test_diff_jpeg_close_to_pil(quality, height, width, seed):
    img = natural_image(height, width, seed)
    pil = pil_jpeg(img, quality)
    approx = jpeg_compress_differentiable(img[None], quality)[0]
    mae_approx = float((approx - pil).abs().mean())
    mae_orig = float((img - pil).abs().mean())
    # Measured: ratio 0.03-0.15 and MAE 0.5-1.3 / 255 (libjpeg's fixed-point DCT is the remaining difference).
    assert mae_approx < 0.3 * mae_orig
    assert mae_approx < 2.0 / 255


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_diff_jpeg_predicts_how_much_perturbation_survives(quality):
    # What matters for G: how much of a +-8/255 perturbation a real re-encode keeps.
    img = natural_image(64, 64, 2)
    noise = (torch.randint(0, 2, img.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 8 / 255
    protected = (img + noise).clamp(0, 1)
    real = float((pil_jpeg(protected, quality) - pil_jpeg(img, quality)).abs().mean())
    approx = jpeg_compress_differentiable(torch.stack([protected, img]), quality)
    simulated = float((approx[0] - approx[1]).abs().mean())
    assert simulated == pytest.approx(real, rel=0.25)


def test_jpeg_per_sample_quality_and_autocast():
    x = natural_image(40, 48)[None].expand(2, -1, -1, -1).contiguous()
    both = jpeg_compress_differentiable(x, torch.tensor([10.0, 90.0]))
    torch.testing.assert_close(both[:1], jpeg_compress_differentiable(x[:1], 10))
    torch.testing.assert_close(both[1:], jpeg_compress_differentiable(x[1:], 90))
    assert float((both[0] - x[0]).abs().mean()) > float((both[1] - x[1]).abs().mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = jpeg_compress_differentiable(x, 50)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, jpeg_compress_differentiable(x, 50))
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress_differentiable(x, 0)


# ----------------------------------------------------------------------------------------------- PGD


def test_pgd_increases_loss_within_radius_and_restores_modes():
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    model.drop.eval()  # a deliberately mixed state that must survive the attack
    bn_mean = model.features[1].running_mean.clone()
    x = torch.rand(8, 3, 24, 20)
    labels = torch.randint(0, 5, (8,))
    for steps in (1, 3):
        adv = pgd_perturbation(model, x, labels, RHO, steps=steps, generator=torch.Generator().manual_seed(1))
        assert adv.shape == x.shape and not adv.requires_grad
        assert float(adv.abs().max()) <= RHO
        assert float((x + adv).min()) >= 0.0 and float((x + adv).max()) <= 1.0
        model.eval()
        with torch.no_grad():
            clean = nn.functional.cross_entropy(model(x), labels)
            attacked = nn.functional.cross_entropy(model(x + adv), labels)
        model.train()
        model.drop.eval()
        assert float(attacked) > float(clean)
    assert model.training and model.features.training and not model.drop.training
    assert torch.equal(model.features[1].running_mean, bn_mean)  # attack ran in eval mode
    assert all(p.grad is None for p in model.parameters())  # grads taken w.r.t. the input only


def test_pgd_is_straight_through_in_layer():
    torch.manual_seed(0)
    model = TinyNet()
    layer = DistortionLayer(DistortionConfig(**{**ALL_OFF, "pgd": True}))
    x = (0.2 + 0.6 * torch.rand(4, 3, 20, 24)).requires_grad_(True)
    labels = torch.randint(0, 5, (4,))
    out = layer(x, model, labels)
    diff = (out - x).detach()
    assert float(diff.abs().max()) <= RHO + 1e-6
    assert float(diff.abs().max()) > 0.5 * RHO
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # d(x + const)/dx
    with pytest.raises(ValueError, match="pgd"):
        layer(x)


# ----------------------------------------------------------------------------------------------- layer


def test_flips_with_probability_one():
    x = torch.rand(3, 3, 10, 14)
    h = DistortionLayer(DistortionConfig(**{**ALL_OFF, "hflip_p": 1.0}))
    v = DistortionLayer(DistortionConfig(**{**ALL_OFF, "vflip_p": 1.0}))
    none = DistortionLayer(DistortionConfig(**ALL_OFF))
    assert torch.equal(h(x), x.flip(-1))
    assert torch.equal(v(x), x.flip(-2))
    assert torch.equal(none(x), x)


def test_flips_are_per_sample():
    x = torch.rand(64, 3, 8, 8)
    out = DistortionLayer(DistortionConfig(**{**ALL_OFF, "hflip_p": 0.5}))(x, generator=3)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert 10 < sum(flipped) < 54


@pytest.mark.parametrize("size", [(50, 37), (48, 40), (32, 32)])
@pytest.mark.parametrize("mode", ["chain", "one_of"])
def test_layer_shape_range_and_gradient(size, mode):
    torch.manual_seed(0)
    model = TinyNet()
    cfg = DistortionConfig(mode=mode, jpeg_p=1.0, rescale_p=1.0, sharpness_p=1.0, hflip_p=0.5, vflip_p=0.5)
    layer = DistortionLayer(cfg)
    # Slightly out of [0, 1], as an unclipped x + delta can be.
    x = (torch.rand(4, 3, *size) * 1.1 - 0.05).requires_grad_(True)
    out = layer(x, model, torch.randint(0, 5, (4,)), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.detach().min()) >= 0.0 and float(out.detach().max()) <= 1.0
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert float(x.grad.abs().sum()) > 0


def test_one_of_picks_exactly_one_degrading_op():
    layer = DistortionLayer(DistortionConfig(mode="one_of"))
    masks = layer._masks(1000, torch.Generator().manual_seed(0))
    assert set(masks) == {"jpeg", "rescale", "blur", "sharpness"}
    stacked = torch.stack(list(masks.values()))
    assert torch.equal(stacked.sum(0), torch.ones(1000, dtype=torch.long))
    assert all(150 < int(m.sum()) < 350 for m in masks.values())


def test_chain_probabilities_are_respected():
    layer = DistortionLayer(DistortionConfig(jpeg_p=0.5, rescale_p=0.0, blur_p=1.0, sharpness_p=0.25))
    masks = layer._masks(4000, torch.Generator().manual_seed(0))
    rates = {k: float(v.float().mean()) for k, v in masks.items()}
    assert rates["blur"] == 1.0 and rates["rescale"] == 0.0
    assert math.isclose(rates["jpeg"], 0.5, abs_tol=0.04) and math.isclose(rates["sharpness"], 0.25, abs_tol=0.04)


def test_reproducible_with_generator_and_default_rng_untouched():
    torch.manual_seed(0)
    model = TinyNet()
    layer = DistortionLayer(DistortionConfig(jpeg_p=0.5, rescale_p=0.5, sharpness_p=0.5, hflip_p=0.5, vflip_p=0.5))
    x = torch.rand(6, 3, 32, 28)
    labels = torch.randint(0, 5, (6,))
    state = torch.get_rng_state()
    a = layer(x, model, labels, generator=torch.Generator().manual_seed(7))
    b = layer(x, model, labels, generator=torch.Generator().manual_seed(7))
    c = layer(x, model, labels, generator=7)
    assert torch.equal(torch.get_rng_state(), state)  # all draws came from the passed generator
    assert torch.equal(a, b) and torch.equal(a, c)
    outs = [layer(x, model, labels, generator=s) for s in range(8, 12)]
    assert any(not torch.equal(a, o) for o in outs)


def test_layer_under_autocast_returns_float32():
    torch.manual_seed(0)
    model = TinyNet()
    layer = DistortionLayer(DistortionConfig(jpeg_p=1.0, rescale_p=1.0, sharpness_p=1.0))
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, model, torch.tensor([0, 1]), generator=0)
    assert out.dtype == torch.float32
    # The image ops ran in float32: without PGD the result equals the non-autocast one exactly.
    no_pgd = DistortionLayer(DistortionConfig(pgd=False, jpeg_p=1.0, rescale_p=1.0, sharpness_p=1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = no_pgd(x, generator=0)
    assert torch.equal(auto, no_pgd(x, generator=0))


def test_distortion_and_attacker_share_one_blur_and_one_pgd():
    from segue_dist import attacks, distortion, ops

    assert distortion.gaussian_blur is attacks.gaussian_blur is ops.gaussian_blur
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.rand(4, 3, 24, 20), torch.randint(0, 5, (4,))
    delta = ops.pgd_delta(
        model, x, y, radius=RHO, steps=3, random_start=True, generator=torch.Generator().manual_seed(2)
    )
    assert float(delta.abs().max()) <= RHO and float(delta.abs().max()) > 0
    # The attacker's PGD is x + the shared δ; the distortion layer's (3 steps: random start) is the δ itself.
    adv = attacks.pgd_linf(model, x, y, rho=RHO, steps=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(adv, (x + delta).clamp(0, 1))
    same = distortion.pgd_perturbation(model, x, y, RHO, steps=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(same, delta)


def test_blur_of_an_image_smaller_than_the_kernel_falls_back_to_replicate_padding():
    tiny = torch.rand(2, 3, 2, 2)
    out = gaussian_blur(tiny, 5, 1.0)  # reflect padding of 2 needs sides > 2
    assert out.shape == tiny.shape and float(out.min()) >= float(tiny.min()) - 1e-6
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(tiny, 4, 1.0)
