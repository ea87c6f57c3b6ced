"""The grayscale twin surrogate (`surrogate.grayscale_twin`): its grayscale network sees luminance only, its loss is
the mean of the two networks', a whole training run with it resumes bit for bit and exports a plain G, and a reset
can renew its grayscale network alone (`f_reset_part=gray`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from train_testing import build_tiny_shards, run_train

import segue_dist.train as train_module
from segue_dist.distortion import to_grayscale
from segue_dist.models import build_classifier
from segue_dist.models.surrogate import GrayscaleTwin, view_cross_entropy
from segue_dist.train import reset_surrogate
from segue_dist.training.build import build_surrogate
from segue_dist.training.config import DataConfig, SurrogateConfig, TrainConfig
from segue_dist.weights import load_generator, load_state

TWIN = "surrogate.grayscale_twin=true"


def twin(k: int = 5) -> GrayscaleTwin:
    torch.manual_seed(0)
    net = GrayscaleTwin(build_classifier("resnet18", k, 32, small_stem=False), build_classifier("resnet18", k, 32))
    return net.eval()


def luma_free(shape: tuple[int, ...]) -> torch.Tensor:
    """A colour pattern with zero BT.601 luminance: what the grayscale network must not see."""
    c = torch.rand(shape) - 0.5
    gray = to_grayscale(c)[:, :1]
    return (c - gray) * 0.1


def test_the_grayscale_network_sees_luminance_only_and_the_colour_network_sees_colour() -> None:
    net = twin()
    x = torch.rand(4, 3, 32, 32) * 0.8 + 0.1
    with torch.no_grad():
        a, b = net(x), net(x + luma_free(x.shape))
    assert a.shape == (4, 5, 2)
    assert torch.allclose(a[..., 1], b[..., 1], atol=1e-4)  # grayscale view: the colour pattern is gone
    assert (a[..., 0] - b[..., 0]).abs().max() > 1e-3  # colour view: it is not


def test_view_cross_entropy_is_the_mean_of_the_two_networks_losses() -> None:
    logits, y = torch.randn(6, 5, 2), torch.randint(0, 5, (6,))
    both = (F.cross_entropy(logits[..., 0], y) + F.cross_entropy(logits[..., 1], y)) / 2
    assert torch.allclose(view_cross_entropy(logits, y), both)
    assert torch.allclose(view_cross_entropy(logits[..., 0], y), F.cross_entropy(logits[..., 0], y))


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_shards(tmp_path_factory.mktemp("tiny"))


def test_a_twin_run_resumes_bit_identically_and_exports_a_plain_generator(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = run_train(tmp_path / "whole", tiny_shards, TWIN, "distortion.pgd=true")
    tensors, _ = load_state(tmp_path / "whole" / "checkpoints" / "last")
    assert any(k.startswith("f.model.gray.") for k in tensors) and any(k.startswith("f.model.colour.") for k in tensors)
    real_step, calls = train_module.take_step, []

    def crash_at_step_9(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "take_step", crash_at_step_9)
    with pytest.raises(RuntimeError, match="killed"):
        run_train(tmp_path / "split", tiny_shards, TWIN, "distortion.pgd=true")
    monkeypatch.undo()
    resumed = run_train(tmp_path / "split", tiny_shards, TWIN, "distortion.pgd=true")
    assert resumed["steps"] == whole["steps"]
    g_whole, _ = load_generator(tmp_path / "whole" / "generator.safetensors")
    g_split, _ = load_generator(tmp_path / "split" / "generator.safetensors")
    for (name, a), (_, b) in zip(g_whole.state_dict().items(), g_split.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The twin changes what G is trained against: without it the same seed trains another G.
    run_train(tmp_path / "single", tiny_shards, "distortion.pgd=true")
    g_single, _ = load_generator(tmp_path / "single" / "generator.safetensors")
    single, whole_g = g_single.state_dict(), g_whole.state_dict()
    assert any(not torch.equal(single[k], whole_g[k]) for k in single)
    config = json.loads((tmp_path / "whole" / "generator.json").read_text())
    assert config["train_config"]["surrogate"]["grayscale_twin"] is True


def reset_fixture(part: str) -> tuple[TrainConfig, SimpleNamespace]:
    cfg = TrainConfig(
        data=DataConfig(image_size=[32]), surrogate=SurrogateConfig(grayscale_twin=True), f_reset_part=part
    )
    torch.manual_seed(0)
    model = build_surrogate(cfg, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    view_cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.arange(4)).backward()
    optimizer.step()  # every parameter now has Adam state
    return cfg, SimpleNamespace(module=model, base_optimizer=optimizer)


@pytest.mark.parametrize("part", ["gray", "all"])
def test_a_reset_renews_the_part_it_names_and_keeps_the_rest_with_its_adam_state(part: str) -> None:
    cfg, f = reset_fixture(part)
    before = {k: v.clone() for k, v in f.module.state_dict().items()}
    reset_surrogate(f, cfg, 5, epoch=5)  # type: ignore[arg-type]
    after = f.module.state_dict()
    state = f.base_optimizer.state
    for prefix in ("colour.", "gray."):
        renewed = part == "all" or prefix == "gray."
        weights = [k for k in after if k.startswith(prefix) and k.endswith("conv1.weight")]
        assert weights and all(torch.equal(before[k], after[k]) != renewed for k in weights), prefix
        params = [p for n, p in f.module.named_parameters() if n.startswith(prefix)]
        assert all((p in state) != renewed for p in params), prefix


def test_a_gray_only_reset_needs_a_twin() -> None:
    with pytest.raises(ValueError, match="f_reset_part=gray needs surrogate.grayscale_twin"):
        TrainConfig(f_reset_part="gray")
    with pytest.raises(ValueError, match="f_reset_part must be one of all, gray"):
        TrainConfig(f_reset_part="colour")
