"""δ statistics (grey share, class-mean cosine) and the Orthogonal Projection attacker that removes class patterns."""

from __future__ import annotations

import pytest
import torch

from segue_dist import attacks
from segue_dist.attacks import AttackerConfig
from segue_dist.metrics.perturbation import class_mean_cosine, delta_statistics, grey_energy_share


def test_grey_share_is_one_for_equal_planes_and_zero_for_colour_differences() -> None:
    g = torch.Generator().manual_seed(0)
    plane = torch.randn(4, 1, 8, 8, generator=g)
    assert grey_energy_share(plane.expand(-1, 3, -1, -1)) == pytest.approx(1.0)
    assert grey_energy_share(torch.cat([plane, -plane, torch.zeros_like(plane)], dim=1)) == pytest.approx(0.0)
    # blue against yellow (-R -G +B): one ninth of its energy is grey
    assert grey_energy_share(torch.cat([-plane, -plane, plane], dim=1)) == pytest.approx(1 / 9)
    assert grey_energy_share(torch.zeros(2, 3, 4, 4)) == 0.0


def test_class_mean_cosine_separates_class_patterns_from_per_image_noise() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(6).repeat_interleave(20)
    patterns = torch.randn(6, 3, 16, 16, generator=g)
    assert class_mean_cosine(patterns[labels], labels) == pytest.approx(1.0)
    noise = torch.randn(len(labels), 3, 16, 16, generator=g)
    # per-image noise: cosine with a mean of 20 such images is about 1/sqrt(20) = 0.22
    assert class_mean_cosine(noise, labels) < 0.3
    stats = delta_statistics(patterns[labels] + 0.1 * noise, labels)
    assert stats["class_mean_cosine"] > 0.95 and set(stats) == {"grey_energy_share", "class_mean_cosine"}
    with pytest.raises(ValueError, match="labels must have shape"):
        class_mean_cosine(noise, labels[:-1])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        grey_energy_share(noise[:, :1])


def _class_signal(x: torch.Tensor, labels: torch.Tensor, patterns: torch.Tensor) -> float:
    """Mean over classes of the projection of the class's mean image onto its own pattern direction."""
    flat = x.float().flatten(1)
    centred = flat - flat.mean(0)
    unit = patterns.flatten(1) / patterns.flatten(1).norm(dim=1, keepdim=True)
    return float(torch.stack([centred[labels == k].mean(0) @ unit[k] for k in range(len(patterns))]).mean())


def test_orthogonal_projection_removes_a_class_wise_pattern_and_little_else() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(8).repeat_interleave(40)
    clean = torch.randint(40, 216, (len(labels), 3, 16, 16), generator=g, dtype=torch.uint8)
    patterns = torch.randint(0, 2, (8, 3, 16, 16), generator=g).float() * 16 - 8  # +-8 levels
    protected = (clean.float() + patterns[labels]).clamp(0, 255).to(torch.uint8)
    cfg = AttackerConfig(name="op", orthogonal_projection=True)
    assert cfg.group == "projection"
    projected = attacks.transform_images(protected, cfg, train=True, labels=labels)
    assert projected.dtype == torch.uint8 and projected.shape == protected.shape
    before, after = _class_signal(protected, labels, patterns), _class_signal(projected, labels, patterns)
    assert before > 100 and after < 0.3 * before, (before, after)
    # Centred about the mean image, the projection of noise images moves a pixel by about sigma * sqrt(K / D) =
    # 50 * sqrt(8 / 768) = 5 levels (measured 7.2); removing the mean face too (x - Q Q^T x) moved it by 56.
    moved = (attacks.orthogonal_projection(clean, labels).float() - clean.float()).abs().mean()
    assert moved < 12, moved
    # Test images are never projected; the training labels are required.
    assert torch.equal(attacks.transform_images(protected, cfg, train=False), protected)
    with pytest.raises(ValueError, match="needs the training labels"):
        attacks.transform_images(protected, cfg, train=True)
