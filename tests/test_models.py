"""Generator G and classifier factory: exact bit codes, the eps bound, sizes, conditioning, weights loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from segue_dist.models import (
    ARCHITECTURES,
    GeneratorConfig,
    SegueGenerator,
    build_classifier,
    count_parameters,
    label_bits,
)

EPS = 8 / 255


def small_generator(seed: int = 0, **overrides) -> SegueGenerator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(**{"width": 8, "num_res_blocks": 2, **overrides})
    return SegueGenerator(cfg)


# ----------------------------------------------------------------------------------------------- bit code


def test_label_bits_exact_against_python_format():
    labels = [0, 1, 5, 255, 256, 1000, 32768, 40503, 65535]
    code = label_bits(torch.tensor(labels), 16)
    assert code.shape == (len(labels), 16)
    assert code.dtype == torch.float32
    for row, y in zip(code.tolist(), labels, strict=True):
        assert "".join(str(int(b)) for b in row) == format(y, "016b")


def test_label_bits_five_is_msb_first():
    assert label_bits(torch.tensor([5]), 16)[0].tolist() == [0.0] * 13 + [1.0, 0.0, 1.0]
    assert label_bits(torch.tensor([5]), 4)[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_label_bits_32_bits():
    y = 2**32 - 1
    assert label_bits(torch.tensor([y, 2**31]), 32).tolist() == [[1.0] * 32, [1.0] + [0.0] * 31]


@pytest.mark.parametrize("bad", [[-1], [65536], [3, 70000]])
def test_label_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="labels must be in"):
        label_bits(torch.tensor(bad), 16)


def test_label_bits_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        label_bits(torch.tensor([1.0]), 16)


# ----------------------------------------------------------------------------------------------- config


def test_config_too_few_bits_names_both_fields():
    with pytest.raises(ValueError, match=r"bits=3.*num_classes=10"):
        GeneratorConfig(num_classes=10, bits=3)
    GeneratorConfig(num_classes=16, bits=4)  # exactly enough


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 0),
        ("bits", 33),
        ("eps", 0.0),
        ("eps", 1.5),
        ("width", 0),
        ("num_res_blocks", -1),
        ("num_classes", 0),
        ("decoder_norm", "batch"),
        ("label_at_output", "yes"),
        ("side_info", "bits"),
        ("upsample", "pixelshuffle"),
        ("template_size", 0),
        ("template_channels", 0),
        ("luma_weight", 1.5),
        ("template_skip", -1.0),
        ("output_rms_gain", -1.0),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        GeneratorConfig(**{field: value})


# ----------------------------------------------------------------------------------------------- generator


def test_delta_bounded_by_eps_for_extreme_inputs():
    g = small_generator()
    # Scale the head up so tanh saturates: the bound must still hold exactly.
    with torch.no_grad():
        g.head.weight.mul_(1e4)
    labels = torch.tensor([0, 7, 65535])
    inputs = [
        torch.zeros(3, 3, 32, 32),
        torch.ones(3, 3, 32, 32),
        torch.rand(3, 3, 32, 32),
        1e3 * torch.randn(3, 3, 32, 32),
    ]
    for x in inputs:
        with torch.no_grad():
            delta = g(x, labels)
        assert delta.dtype == torch.float32
        assert torch.isfinite(delta).all()
        assert float(delta.abs().max()) <= EPS  # compared as a Python double
        assert bool((delta.abs() <= EPS).all())
    # Saturation actually happened, so the test exercised the bound.
    assert float(delta.abs().max()) > 0.99 * EPS


def test_eps_bound_for_eps_whose_float32_rounds_up():
    eps = 0.1  # float32(0.1) > 0.1
    assert float(torch.tensor(eps, dtype=torch.float32)) > eps
    g = small_generator(eps=eps)
    with torch.no_grad():
        g.head.weight.mul_(1e4)
    with torch.no_grad():
        assert float(g(100 * torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).abs().max()) <= eps


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (112, 112), (224, 224), (48, 40), (50, 37), (37, 50)])
def test_output_matches_input_size(size):
    g = small_generator()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        delta = g(x, torch.tensor([1, 2]))
        out = g.perturb(x, torch.tensor([1, 2]))
    assert delta.shape == x.shape
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - x).abs().max()) <= EPS + 1e-6


def test_gradient_reaches_every_parameter():
    g = small_generator()
    x = torch.rand(2, 3, 36, 44)
    loss = g(x, torch.tensor([3, 4])).square().sum()
    loss.backward()
    for name, p in g.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name


def test_generator_conditions_on_labels():
    g = small_generator().eval()
    x = torch.rand(1, 3, 32, 32).expand(4, -1, -1, -1)
    with torch.no_grad():
        delta = g(x, torch.tensor([0, 1, 5, 65535]))
        # Same image and label -> same delta (no batch statistics anywhere: the batch does not leak in).
        again = g(torch.cat([x[:1], torch.rand(1, 3, 32, 32)]), torch.tensor([5, 0]))
    scale = float(delta.abs().mean())
    for i in range(4):
        for j in range(i + 1, 4):
            # Already at init the label moves delta by a visible fraction of its size (the fusion keeps it).
            assert float((delta[i] - delta[j]).abs().mean()) > 0.02 * scale, (i, j)
    torch.testing.assert_close(again[0], delta[2])


def test_default_generator_has_no_norm_after_the_fusion():
    """The measured choice (models/generator.py): InstanceNorm only in the encoder, biased convs after the fusion."""
    assert GeneratorConfig().decoder_norm == "none"
    g = SegueGenerator(GeneratorConfig(width=8, num_res_blocks=1))
    after_fusion = [*g.blocks.modules(), *g.decoder.modules()]
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in after_fusion)
    assert all(m.bias is not None for m in after_fusion if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    assert isinstance(g.encoder[0].norm, torch.nn.InstanceNorm2d)
    with_norm = SegueGenerator(GeneratorConfig(width=8, num_res_blocks=1, decoder_norm="instance"))
    assert isinstance(with_norm.decoder[0].norm, torch.nn.InstanceNorm2d)


@pytest.mark.parametrize("size", [(32, 32), (45, 61)])
def test_label_at_output_feeds_the_code_to_the_head(size):
    cfg = GeneratorConfig(width=8, num_res_blocks=1, label_at_output=True)
    g = SegueGenerator(cfg)
    assert g.head.in_channels == 8 + cfg.bits
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        a, b = g(x, torch.tensor([0, 0])), g(x, torch.tensor([0, 5]))
    assert a.shape == x.shape and float(a.abs().max()) <= cfg.eps
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def template_generator(**kw) -> SegueGenerator:
    torch.manual_seed(0)
    cfg = dict(
        width=8, num_res_blocks=1, side_info="template", template_size=4, label_at_output=True, upsample="resize"
    )
    return SegueGenerator(GeneratorConfig(**{**cfg, **kw}))


def test_template_skip_needs_a_template():
    with pytest.raises(ValueError, match="template_skip needs side_info=template"):
        GeneratorConfig(template_skip=20.0)


@pytest.mark.parametrize("size", [(32, 32), (45, 61), (112, 112)])
def test_template_side_information_is_spatial_and_per_label(size):
    g = template_generator(template_skip=20.0)
    code = torch.eye(16)[:2]
    template = g.side_information(code)
    assert template.shape == (2, 16, 4, 4)
    assert template[0].std(dim=(-2, -1)).mean() > 0  # varies over space, unlike the broadcast code
    x = torch.rand(1, 3, *size).expand(3, -1, -1, -1)
    with torch.no_grad():
        delta = g(x, torch.tensor([0, 1, 60000]))  # 60000: a label no training set had still gets its own pattern
    assert delta.shape == x.shape and float(delta.abs().max()) <= g.eps
    assert not torch.equal(delta[0], delta[1]) and not torch.equal(delta[1], delta[2])
    # The direct path paints a coarse pattern: most of delta's energy is at the template's scale, not pixel noise.
    coarse = torch.nn.functional.avg_pool2d(delta, 4)
    assert float(coarse.pow(2).mean()) > 0.5 * float(delta.pow(2).mean())


def test_resize_decoder_has_no_transposed_convolution():
    g = template_generator()
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in small_generator().modules())


def test_luma_part_is_kept_by_grayscale_and_bound_holds():
    g = template_generator(luma_weight=0.75)
    assert g.head.out_channels == 4
    with torch.no_grad():
        g.head.weight.mul_(1e4)  # saturate: the mix of the two tanh parts must still respect eps
        delta = g(torch.rand(2, 3, 32, 32), torch.tensor([3, 4]))
    assert float(delta.abs().max()) <= g.eps
    # The common (luminance) part is at least luma_weight * eps wherever both parts saturate with the same sign.
    common = delta.mean(dim=1)
    assert float(common.abs().max()) >= 0.75 * g.eps - 1e-6


def test_rms_bound_does_not_saturate_when_the_head_output_explodes():
    # A plain tanh head whose output has grown large sits at +-eps almost everywhere, where tanh passes no gradient
    # back and G stops learning. The RMS bound makes delta independent of the output's scale.
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 4])

    def delta_at(gain: float, scale: float) -> torch.Tensor:
        g = template_generator(output_rms_gain=gain)
        with torch.no_grad():
            g.head.weight.mul_(scale)
            g.head.bias.mul_(scale)
            return g(x, y)

    def saturated(delta: torch.Tensor) -> float:
        return float((delta.abs() >= 0.95 * 8 / 255).float().mean())

    assert saturated(delta_at(0.0, 1e3)) > 0.9  # the failure the option exists for
    small, big = delta_at(1.5, 1.0), delta_at(1.5, 1e3)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)  # float32 at 1e3x
    assert 0.0 < saturated(big) < 0.5
    assert float(big.abs().max()) <= 8 / 255


def test_generator_deterministic_with_seed():
    x = torch.rand(2, 3, 40, 40)
    y = torch.tensor([3, 9])
    a, b, c = small_generator(seed=11), small_generator(seed=11), small_generator(seed=12)
    assert torch.equal(a(x, y), b(x, y))
    assert not torch.equal(a(x, y), c(x, y))
    assert list(a.state_dict()) == list(b.state_dict())


def test_parameter_names_are_stable():
    keys = set(small_generator().state_dict())
    for key in ("encoder.0.conv.weight", "encoder.2.norm.bias", "fuse.weight", "blocks.1.conv2.weight", "head.bias"):
        assert key in keys


def test_fusion_input_width_follows_bits():
    g = small_generator(bits=5, num_classes=20)
    assert g.fuse.in_channels == 4 * 8 + 5
    assert g(torch.rand(1, 3, 32, 32), torch.tensor([31])).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="labels must be in"):
        g(torch.rand(1, 3, 32, 32), torch.tensor([32]))


def test_generator_rejects_bad_shapes():
    g = small_generator()
    with pytest.raises(ValueError, match="labels"):
        g(torch.rand(2, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="x must have shape"):
        g(torch.rand(2, 1, 32, 32), torch.tensor([1, 2]))


def test_generator_under_bf16_autocast():
    g = small_generator()
    x = torch.rand(2, 3, 48, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = g(x, torch.tensor([1, 2]))
    assert delta.dtype == torch.float32
    assert delta.shape == x.shape
    assert float(delta.detach().abs().max()) <= EPS
    delta.sum().backward()
    assert g.head.weight.grad is not None


# ----------------------------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_classifier_forward_backward_small(arch):
    for size in (32, 64):
        torch.manual_seed(0)
        model = build_classifier(arch, num_classes=7, image_size=size).train()
        assert model.small_stem
        x = torch.rand(2, 3, size, size, requires_grad=True)
        logits = model(x)
        assert logits.shape == (2, 7)
        logits.logsumexp(dim=1).sum().backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resnet18_at_224_and_non_square():
    model = build_classifier("resnet18", num_classes=7, image_size=224)
    assert not model.small_stem
    assert model.backbone.conv1.kernel_size == (7, 7)
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    model(x).sum().backward()
    assert float(x.grad.abs().sum()) > 0
    assert build_classifier("resnet18", 7, (50, 37))(torch.rand(2, 3, 50, 37)).shape == (2, 7)


def test_small_stem_choices():
    r = build_classifier("resnet18", 7, 32)
    assert r.backbone.conv1.kernel_size == (3, 3) and r.backbone.conv1.stride == (1, 1)
    assert isinstance(r.backbone.maxpool, torch.nn.Identity)
    assert build_classifier("resnet18", 7, 112).small_stem
    assert not build_classifier("resnet18", 7, (113, 200)).small_stem
    assert build_classifier("mobilenet_v2", 7, 64).backbone.features[0][0].stride == (1, 1)
    assert build_classifier("mobilenet_v2", 7, 64, small_stem=False).backbone.features[0][0].stride == (2, 2)
    assert build_classifier("efficientnet_b1", 7, 64).backbone.features[0][0].stride == (1, 1)
    assert build_classifier("swin_t", 7, 64).backbone.features[0][0].kernel_size == (2, 2)


def test_classifier_normalises_inside():
    model = build_classifier("mobilenet_v2", 7, 32).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    x = mean.expand(1, 3, 32, 32)
    seen = {}

    def grab(_module, args):
        seen["x"] = args[0]

    model.backbone.register_forward_pre_hook(grab)
    model(x)
    assert float(seen["x"].abs().max()) < 1e-6
    # Normalisation constants are not checkpoint state.
    assert all(k.startswith("backbone.") for k in model.state_dict())


def test_inception_upsamples_small_inputs():
    model = build_classifier("inception_v3", 7, 32).eval()
    seen = {}

    def grab(_module, args):
        seen["shape"] = args[0].shape

    model.backbone.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 48))
    assert tuple(seen["shape"][-2:]) == (75, 113)


def test_unknown_arch_lists_allowed():
    with pytest.raises(ValueError, match="resnet18.*swin_t"):
        build_classifier("vgg16", 7)


def test_pretrained_safetensors_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = build_classifier("resnet18", 7, 32)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_classifier("resnet18", 7, 32, pretrained=str(path))
    assert dst.reinitialized_keys == ()
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(src.eval()(x), dst.eval()(x))


def test_pretrained_torch_file_backbone_keys_and_new_head(tmp_path):
    torch.manual_seed(0)
    src = build_classifier("mobilenet_v2", 10, 32)
    path = tmp_path / "mnv2.pt"
    torch.save(src.backbone.state_dict(), path)  # torchvision-style keys (no "backbone." prefix)
    dst = build_classifier("mobilenet_v2", 7, 32, pretrained=path)
    assert set(dst.reinitialized_keys) == {"classifier.1.weight", "classifier.1.bias"}
    assert dst.backbone.classifier[1].weight.shape == (7, 1280)
    assert torch.equal(dst.backbone.features[3].conv[0][0].weight, src.backbone.features[3].conv[0][0].weight)


def test_pretrained_wrong_shape_raises(tmp_path):
    src = build_classifier("resnet18", 7, 32)  # small stem: conv1 is 3x3
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"shape mismatches.*conv1\.weight"):
        build_classifier("resnet18", 7, 224, pretrained=path)


def test_pretrained_missing_or_unexpected_keys_raise(tmp_path):
    state = build_classifier("resnet18", 7, 32).state_dict()
    missing = dict(state)
    del missing["backbone.layer1.0.conv1.weight"]
    save_file({k: v.contiguous() for k, v in missing.items()}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        build_classifier("resnet18", 7, 32, pretrained=tmp_path / "missing.safetensors")
    extra = {**state, "backbone.extra.weight": torch.zeros(1)}
    save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys"):
        build_classifier("resnet18", 7, 32, pretrained=tmp_path / "extra.safetensors")
    with pytest.raises(FileNotFoundError):
        build_classifier("resnet18", 7, 32, pretrained=tmp_path / "nope.safetensors")


def test_count_parameters():
    model = build_classifier("resnet18", 7, 224)
    # torchvision resnet18 with a 7-way head: 11,689,512 - 512*993 - 993 (1000-way head minus 7-way head).
    assert count_parameters(model) == 11_689_512 - 993 * 513
    model.backbone.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 7 * 513
