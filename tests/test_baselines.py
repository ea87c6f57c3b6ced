"""Baselines (random noise, LSP, UE, TAP): budgets, determinism, class structure, separability, error minimisation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segue_dist.baselines import (
    BASELINES,
    LSP,
    RandomNoise,
    TAPConfig,
    UEConfig,
    default_patch_grid,
    generate_ue,
    make_baseline_perturbations,
    run_ue,
)

EPS = 8 / 255
K, PER, SIZE = 4, 16, 32
# Tiny UE budget: enough rounds for the min-min loop to bite on 64 images, seconds on 2 CPU cores.
UE_FAST: dict[str, Any] = {"pgd_steps": 3, "train_steps": 3, "max_rounds": 2, "batch_size": 32}
TAP_FAST: dict[str, Any] = {"train_epochs": 2, "pgd_steps": 4, "batch_size": 32}


def tiny_cnn(num_classes: int = K, size: int = SIZE) -> nn.Module:
    # No global pooling: a flattened spatial map keeps the surrogate sensitive to small pixel patterns, as ResNets are.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (size // 4) ** 2, num_classes),
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny convolutions gain nothing from intra-op threads and lose a lot to contention on a busy 2-core box.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.rand(K * PER, 3, SIZE, SIZE, generator=g)
    # Saturated pixels make the [0, 1] projection matter.
    x[:, :, :4] = 1.0
    x[:, :, -4:] = 0.0
    y = torch.arange(K).repeat_interleave(PER)
    return x, y


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "random-samplewise": ("random", {}),
    "random-classwise": ("random", {"classwise": True}),
    "lsp-samplewise": ("lsp", {}),
    "lsp-classwise": ("lsp", {"samplewise": False}),
    "lsp-rescale": ("lsp", {"linf_mode": "rescale"}),
    "ue-samplewise": ("ue", {"mode": "samplewise", **UE_FAST}),
    "ue-classwise": ("ue", {"mode": "classwise", **UE_FAST}),
    "tap": ("tap", TAP_FAST),
}


def _make(method: str, kw: dict[str, Any], x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    factory: Callable[[], nn.Module] | None = tiny_cnn if method in ("ue", "tap") else None
    return make_baseline_perturbations(method, x, y, num_classes=K, eps=EPS, seed=seed, model_factory=factory, **kw)


@pytest.mark.parametrize(("method", "kw"), list(CASES.values()), ids=list(CASES))
def test_budget_validity_and_determinism(
    method: str, kw: dict[str, Any], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = data
    rng_before = torch.get_rng_state()
    d1 = _make(method, kw, x, y, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "a baseline must not consume the global RNG"
    assert d1.shape == x.shape and d1.dtype == torch.float32
    assert float(d1.abs().max()) <= EPS + 1e-6
    adv = x + d1
    assert float(adv.min()) >= -1e-6 and float(adv.max()) <= 1 + 1e-6
    assert float(d1.abs().max()) > EPS / 2, "perturbation should use a good part of the budget"
    d2 = _make(method, kw, x, y, seed=0)
    assert torch.equal(d1, d2), "same seed must give bit-identical perturbations"
    d3 = _make(method, kw, x, y, seed=1)
    assert not torch.allclose(d1, d3), "a different seed must give different perturbations"


def test_registry_and_errors(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    assert set(BASELINES) == {"random", "lsp", "tap", "ue"}
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline_perturbations("tue", x, y, num_classes=K)
    with pytest.raises(ValueError, match="model_factory"):
        make_baseline_perturbations("ue", x, y, num_classes=K)
    with pytest.raises(ValueError, match="labels must be in"):
        make_baseline_perturbations("lsp", x, y, num_classes=2)
    with pytest.raises(ValueError, match="mode"):
        UEConfig(mode="universal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        RandomNoise(eps=0.0)
    with pytest.raises(ValueError, match="linf_mode"):
        LSP(K, (SIZE, SIZE), linf_mode="l2")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------- random noise
def test_random_noise_keyed_not_order_dependent() -> None:
    gen = RandomNoise(eps=EPS, seed=7)
    keys = ["a/001", "a/002", "b/003"]
    d = gen.perturbation(None, keys, size=(20, 24))
    d_rev = gen.perturbation(None, keys[::-1], size=(20, 24))
    assert torch.equal(d, d_rev.flip(0))
    assert not torch.equal(d[0], d[1])
    # roughly uniform on [-eps, eps]
    big = gen.perturbation(None, list(range(64)), size=(32, 32))
    assert abs(float(big.mean())) < EPS * 0.02 and float(big.abs().mean()) == pytest.approx(EPS / 2, rel=0.02)
    with pytest.raises(ValueError, match="keys"):
        gen.perturbation(torch.zeros(2, dtype=torch.long), None, size=(8, 8))


def test_random_noise_classwise_structure() -> None:
    gen = RandomNoise(eps=EPS, seed=3, classwise=True, base_size=(16, 16))
    y = torch.tensor([0, 1, 0, 2, 1])
    d = gen.perturbation(y, size=(32, 32))
    assert torch.equal(d[0], d[2]) and torch.equal(d[1], d[4])
    assert not torch.equal(d[0], d[1]) and not torch.equal(d[1], d[3])
    # The same pattern at any size: 16 -> 32 nearest resize is exact 2x pixel repetition.
    base = gen.perturbation(y[:1], size=(16, 16))[0]
    assert torch.equal(d[0], base.repeat_interleave(2, 1).repeat_interleave(2, 2))
    odd = gen.perturbation(y, size=(37, 23))
    assert odd.shape == (5, 3, 37, 23) and float(odd.abs().max()) <= EPS
    x = torch.rand(5, 3, 32, 32)
    out = gen.apply(x, y)
    assert torch.equal(out, (x + d).clamp(0, 1))


# ---------------------------------------------------------------------------------------------------------------- LSP
def test_lsp_default_grid_matches_official_settings() -> None:
    assert default_patch_grid((32, 32)) == (4, 4)  # patch 8 on CIFAR
    assert default_patch_grid((224, 224)) == (7, 7)  # patch 32 on ImageNet
    assert default_patch_grid((112, 96)) == (4, 4)
    lsp = LSP(K, (30, 45), patch_grid=(4, 4), samplewise=False)
    d = lsp.perturbation(torch.arange(K))
    assert d.shape == (K, 3, 30, 45)
    # piecewise constant on the grid: patch size ceil(30/4)=8 by ceil(45/4)=12
    assert torch.equal(d[:, :, :8, :12], d[:, :, :1, :1].expand(-1, -1, 8, 12))


def test_lsp_classwise_identical_within_class() -> None:
    lsp = LSP(K, (SIZE, SIZE), eps=EPS, seed=0, samplewise=False)
    y = torch.tensor([2, 0, 2, 1, 0, 3])
    d = lsp.perturbation(y)
    assert torch.equal(d[0], d[2]) and torch.equal(d[1], d[4])
    flat = lsp.perturbation(torch.arange(K)).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == K
    # Class centres are hypercube vertices: after L2 normalisation every pixel is exactly +-eps.
    torch.testing.assert_close(d.abs(), torch.full_like(d, EPS))


def test_lsp_samplewise_keyed_and_l2_budget() -> None:
    lsp = LSP(K, (SIZE, SIZE), eps=EPS, seed=0, linf_mode="rescale")
    y = torch.tensor([0, 0, 1])
    d = lsp.perturbation(y, [10, 11, 12])
    assert not torch.equal(d[0], d[1]), "sample-wise LSP: every image its own draw from the class cluster"
    d_perm = lsp.perturbation(y[[2, 0, 1]], [12, 10, 11])
    assert torch.equal(d_perm, d[[2, 0, 1]])
    with pytest.raises(ValueError, match="indices"):
        lsp.perturbation(y)
    # Clip keeps more energy than rescale, never more than the official L2 budget sqrt(D) * eps (RMS = eps).
    clip = LSP(K, (SIZE, SIZE), eps=EPS, seed=0).perturbation(y, [10, 11, 12])
    rms_clip, rms_rescale = clip.pow(2).mean().sqrt(), d.pow(2).mean().sqrt()
    assert rms_rescale < rms_clip <= EPS + 1e-7
    assert float(d.flatten(1).abs().amax(1).min()) == pytest.approx(EPS, rel=1e-5)  # rescale: peak exactly eps


def test_lsp_too_coarse_grid_for_classes() -> None:
    with pytest.raises(ValueError, match="distinct class centres"):
        LSP(10, (32, 32), patch_grid=(1, 1))  # d = 3 -> only 8 centres


def test_lsp_perturbations_are_linearly_separable() -> None:
    """A linear probe trained on delta alone generalises to held-out draws (LSP), not for sample-wise noise.

    Bound: on the project's 2-core AMD EPYC, with torch's AVX-512 and AVX2 kernels alike, the probe scored 1.0 on LSP's
    held-out draws and 0.15 on random noise's (chance 0.125): 0.95 and 0.4 are far from both.
    """
    from sklearn.linear_model import LogisticRegression

    n_cls, per = 8, 30
    y = torch.arange(n_cls).repeat(per)
    keys = list(range(y.numel()))
    train, test = slice(0, n_cls * per // 2), slice(n_cls * per // 2, None)

    def probe(delta: torch.Tensor) -> tuple[float, float]:
        f = delta.flatten(1).double().numpy() / EPS
        clf = LogisticRegression(max_iter=3000).fit(f[train], y[train].numpy())
        return clf.score(f[train], y[train].numpy()), clf.score(f[test], y[test].numpy())

    side = 16  # 768 features: enough for the 4x4 grid, keeps the probe fast
    lsp_train, lsp_test = probe(LSP(n_cls, (side, side), eps=EPS, seed=0).perturbation(y, keys))
    assert lsp_train == 1.0 and lsp_test >= 0.95
    _, rnd_test = probe(RandomNoise(eps=EPS, seed=0).perturbation(y, keys, size=(side, side)))
    assert rnd_test < 0.4  # chance is 1/8: sample-wise random noise carries no class signal


# ----------------------------------------------------------------------------------------------------------------- UE
def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("mode", ["samplewise", "classwise"])
def test_ue_is_error_minimising(mode: str) -> None:
    size = 16
    g = torch.Generator().manual_seed(5)
    x = torch.rand(K * PER, 3, size, size, generator=g)
    x[:, :, :2] = 1.0
    y = torch.arange(K).repeat_interleave(PER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_cnn(size=size)
    calls: list[tuple[int, float]] = []
    res = run_ue(
        model,
        x,
        y,
        UEConfig(mode=mode, pgd_steps=10, train_steps=10, max_rounds=6, batch_size=32),  # type: ignore[arg-type]
        seed=0,
        progress_callback=lambda r, a: calls.append((r, a)),
    )
    assert calls == res.history and len(calls) == res.rounds and calls[0][0] == 1
    assert float(res.delta.abs().max()) <= EPS + 1e-6
    # The min-min noise makes the images *easier* for the surrogate it was optimised with; random noise of the same
    # budget does not.
    random_delta = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    clean = _ce(model, x, y)
    rand = _ce(model, (x + random_delta).clamp(0, 1), y)
    unlearnable = _ce(model, (x + res.delta).clamp(0, 1), y)
    assert unlearnable < clean - 0.05 and unlearnable < rand - 0.05, (clean, rand, unlearnable)
    if mode == "classwise":
        cn = res.class_noise
        assert cn is not None and cn.shape == (K, 3, size, size)
        assert float(cn.abs().max()) <= EPS + 1e-6
        torch.testing.assert_close(res.delta, (x + cn[y]).clamp(0, 1) - x)
        assert torch.unique(cn.flatten(1), dim=0).shape[0] == K
    else:
        assert res.class_noise is None


def test_ue_stopping_rule(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    # Unreachable threshold: runs exactly max_rounds and reports non-convergence.
    res = run_ue(tiny_cnn(), x, y, UEConfig(stop_acc=1.0, pgd_steps=1, train_steps=1, max_rounds=2, batch_size=32))
    assert res.rounds == 2 and len(res.history) == 2
    assert res.converged == (res.train_acc >= 1.0)
    # Trivial threshold: stops after the first round.
    res = run_ue(tiny_cnn(), x, y, UEConfig(stop_acc=1e-9, pgd_steps=1, train_steps=1, max_rounds=5, batch_size=32))
    assert res.rounds == 1 and res.converged


def test_generate_ue_returns_delta(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m1, m2 = tiny_cnn(), tiny_cnn()
    m2.load_state_dict(m1.state_dict())
    d = generate_ue(m1, x[:16], y[:16], pgd_steps=2, train_steps=2, max_rounds=2, batch_size=8, seed=3)
    r = run_ue(m2, x[:16], y[:16], UEConfig(pgd_steps=2, train_steps=2, max_rounds=2, batch_size=8), seed=3)
    assert torch.equal(d, r.delta)
    with pytest.raises(ValueError, match="labels"):
        generate_ue(tiny_cnn(), x[:4], y[:3])
    # The property itself: a sample-wise δ within ε, of the images' shape, that moved (2 PGD steps of UE's step size
    # reach 1.6/255 on most pixels), and x + δ still an image.
    assert d.shape == x[:16].shape and 0 < float(d.abs().max()) <= EPS + 1e-6 and float((d != 0).float().mean()) > 0.5
    assert float((x[:16] + d).min()) >= 0.0 and float((x[:16] + d).max()) <= 1.0
    assert not torch.equal(d[0], d[1])  # per sample, not one pattern for all


def test_ue_batchnorm_surrogate_with_ragged_batches() -> None:
    """N % batch_size == 1 must not hand BatchNorm a training batch of one image."""
    g = torch.Generator().manual_seed(9)
    x = torch.rand(17, 3, 16, 16, generator=g)
    y = torch.arange(17) % K
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, K)
    )
    for mode in ("samplewise", "classwise"):
        res = run_ue(model, x, y, UEConfig(mode=mode, pgd_steps=2, train_steps=4, max_rounds=2, batch_size=8))  # type: ignore[arg-type]
        assert res.delta.shape == x.shape and float(res.delta.abs().max()) <= EPS + 1e-6
    assert model.training, "the surrogate's train/eval mode is restored"


def test_tap_moves_the_surrogate_toward_the_next_class() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(K * PER, 3, SIZE, SIZE, generator=g) * 0.5 + 0.25
    y = torch.arange(K).repeat_interleave(PER)
    half = SIZE // 2
    for k in range(K):  # a brighter quadrant per class: a surrogate learns the classes in a few epochs
        x[y == k, :, (k // 2) * half : (k // 2 + 1) * half, (k % 2) * half : (k % 2 + 1) * half] += 0.2
    built: list[nn.Module] = []

    def factory() -> nn.Module:
        built.append(tiny_cnn())
        return built[-1]

    delta = make_baseline_perturbations("tap", x, y, num_classes=K, eps=EPS, seed=0, model_factory=factory,
                                        train_epochs=6, pgd_steps=10, batch_size=16)  # fmt: skip
    assert float(delta.abs().max()) <= EPS + 1e-6
    surrogate, target = built[0], (y + 1) % K
    with torch.no_grad():
        on_clean = (surrogate(x).argmax(1) == target).float().mean()
        on_tap = (surrogate((x + delta).clamp(0, 1)).argmax(1) == target).float().mean()
    assert on_tap > on_clean + 0.3, (float(on_clean), float(on_tap))
    with pytest.raises(ValueError, match="pgd_steps"):
        TAPConfig(pgd_steps=0)
