"""Model zoo: every family trains a step, the classics are expressible, bad params fail by name."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.spec import hparams, paths
from pipeline.spec.errors import BadInput, ParamError
from pipeline.training import models


def _forward_backward(model: nn.Module) -> torch.Tensor:
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    out.sum().backward()
    return out


@pytest.mark.parametrize("family", hparams.FAMILIES)
def test_every_family_forward_backward(family):
    model = models.build_model(hparams.CLASSIC[family])
    out = _forward_backward(model)
    assert out.shape == (4, 10)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_classic_mlp_is_784_512_256_10_with_batchnorm_and_dropout():
    model = models.build_model(hparams.CLASSIC["mlp"])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 256), (256, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 2
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.5}
    # Forward FLOPs as counted: 2 per multiply-add of the three matmuls.
    assert models.flops_per_image(model) == 2 * (784 * 512 + 512 * 256 + 256 * 10)


def test_mlp_depth_width_taper():
    model = models.build_model({"model": "mlp", "mlp_depth": 3, "mlp_width": 400, "mlp_taper": 0.5,
                                "activation": "gelu", "batch_norm": False})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [400, 200, 100, 10]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert any(isinstance(m, nn.GELU) for m in model.modules())


def test_classic_cnn_is_two_blocks_32_64_with_128_head():
    model = models.build_model(hparams.CLASSIC["cnn"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size) for m in convs] == [(32, (3, 3))] * 2 + [(64, (3, 3))] * 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 7 * 7, 128), (128, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


def test_cnn_transitions_gap_head_and_pool_positions():
    params = {"model": "cnn", "cnn_blocks": 3, "cnn_width": 16, "convs_per_block": 2, "pool": "every",
              "transition_ratio": 0.5, "head": "gap", "head_units": 0, "dropout": 0.1}
    model = models.build_model(params)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    one_by_one = [m for m in convs if m.kernel_size == (1, 1)]
    # 3 blocks x 2 convs, each pooled block followed by a 1x1 transition that halves the depth
    assert len(convs) - len(one_by_one) == 6 and len(one_by_one) == 3
    assert [(m.in_channels, m.out_channels) for m in one_by_one] == [(16, 8), (32, 16), (64, 32)]
    assert any(isinstance(m, models.GlobalAvgPool) for m in model.modules())
    assert _forward_backward(model).shape == (4, 10)


def test_deep_cnn_skips_pools_that_would_collapse_the_map():
    model = models.build_model({"model": "cnn", "cnn_blocks": 6, "cnn_width": 8, "cnn_growth": 1.0, "pool": "every"})
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3  # 28 -> 14 -> 7 -> 3
    assert _forward_backward(model).shape == (4, 10)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"model": "mlp", "activation": "swishy"}, "activation = 'swishy'"),
        ({"model": "cnn", "dropout": -0.1}, "dropout = -0.1"),
        ({"model": "transformer"}, "model = 'transformer'"),
        ({"model": "cnn", "cnn_channels": [32, 0]}, "cnn_channels"),
        ({"model": "cnn", "batch_norm": "yes"}, "batch_norm = 'yes'"),
    ],
)
def test_bad_parameter_is_named(params, fragment):
    with pytest.raises(ParamError, match="expected") as err:
        models.build_model(params)
    assert fragment in str(err.value)


@pytest.mark.parametrize("family", hparams.FAMILIES)
def test_no_op_without_a_deterministic_cuda_backward(family):
    """Deterministic mode refuses these on CUDA; our models must not contain them."""
    refused = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool3d, nn.MaxPool3d, nn.ReflectionPad2d)
    params = {"model": family, "head": "gap", "head_units": 0}
    assert not any(isinstance(m, refused) for m in models.build_model(params).modules())


def test_parameter_count_and_flops_reported():
    model = models.build_model(hparams.CLASSIC["cnn"])
    convs = 1 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9  # bias-free: BatchNorm follows
    norms = 2 * (32 + 32 + 64 + 64)
    head = (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    assert models.count_parameters(model) == convs + norms + head
    assert models.flops_per_image(model) > models.flops_per_image(models.build_model(hparams.CLASSIC["mlp"]))


def test_resnet_finetune_loads_cached_weights(imagenet_weights):
    model = models.build_model({"model": "resnet18", "resnet_mode": "finetune", "backbone_lr_scale": 0.1})
    backbone = model.backbone.state_dict()
    assert torch.equal(backbone["layer3.0.conv1.weight"], imagenet_weights["layer3.0.conv1.weight"])
    # The pretrained RGB stem is kept whole: gray input is repeated to three channels instead.
    assert torch.equal(backbone["conv1.weight"], imagenet_weights["conv1.weight"])
    assert model.backbone.conv1.stride == (1, 1)  # 28 px: full resolution through the stem
    groups = models.parameter_groups(model, {"model": "resnet18", "resnet_mode": "finetune"}, lr=1e-2,
                                     weight_decay=1e-4)
    assert {g["lr"] for g in groups} == {1e-2, 1e-3}  # head at lr, backbone at lr x 0.1
    assert _forward_backward(model).shape == (4, 10)


def test_resnet_feature_extraction_freezes_backbone(imagenet_weights):
    params = {"model": "resnet18", "resnet_mode": "feature_extract"}
    model = models.build_model(params)
    model.train()
    assert not model.backbone.training and model.head.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    groups = models.parameter_groups(model, params, lr=1e-3, weight_decay=0.0)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.head.parameters()}


def test_resnet_pretrained_without_cached_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(BadInput, match="resnet18-f37072fd.pth") as err:
        models.build_model({"model": "resnet18", "resnet_mode": "finetune"})
    assert str(tmp_path / "empty") in str(err.value) and "resnet_mode='scratch'" in str(err.value)


def test_pretrained_input_is_imagenet_normalised_rgb_at_input_size(imagenet_weights):
    """Data normalised with its own statistics goes in; ImageNet-normalised RGB at input_size reaches the stem."""
    mean, std = (0.2,), (0.3,)
    model = models.build_model({"model": "resnet18", "resnet_mode": "finetune", "input_size": 64}, 10,
                               (1, 28, 28), (mean, std))
    pixels = torch.rand(2, 1, 28, 28)
    seen = model.input((pixels - 0.2) / 0.3)
    assert seen.shape == (2, 3, 64, 64)
    resized = torch.nn.functional.interpolate(pixels.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear")
    expected = (resized - torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        models.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen, expected, atol=1e-5)
    assert not any("input" in key for key in model.state_dict())  # derived from config, not weights
    big = models.build_model({"model": "resnet18", "resnet_mode": "finetune", "input_size": 224}, 10, (3, 32, 32),
                             ((0.5,) * 3, (0.25,) * 3))
    assert big.backbone.conv1.stride == (2, 2) and not isinstance(big.backbone.maxpool, torch.nn.Identity)
    assert big(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 64, 48), (3, 8, 8)])
def test_every_family_builds_for_the_data_shape(shape):
    for family in ("mlp", "cnn", "resnet18"):
        model = models.build_model(hparams.CLASSIC[family], 7, shape).eval()
        assert model(torch.zeros(2, *shape)).shape == (2, 7)
        assert models.flops_per_image(model, shape) > 0


def test_a_model_that_cannot_fit_the_image_is_refused_naming_the_key():
    with pytest.raises(ParamError, match="head"):
        models.build_model({"model": "cnn", "cnn_channels": [64], "pool": "none", "head": "flatten"}, 10,
                           (3, 256, 256))
    with pytest.raises(ParamError, match="input_size"):
        models.build_model({"model": "resnet18"}, 10, (3, 4, 4))


def test_torchvision_is_imported_only_when_a_resnet_is_built():
    """Importing it takes about a second, which every process that imports the trainer would pay."""
    code = ("import sys; from pipeline.training import models; before = 'torchvision' in sys.modules; "
            "models.build_model({'model': 'resnet18'}); print(before, 'torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=paths.PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_a_pretrained_resnet_is_rebuilt_without_its_imagenet_weights_for_weights_that_replace_them(tmp_path,
                                                                                                   monkeypatch):
    """imagenet=False (predict, export of a registered champion, counting a trial's parameters): the same network,
    and no ImageNet weights file needed on this machine."""
    from types import SimpleNamespace

    from pipeline.search import objective

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    params = {"model": "resnet18", "resnet_mode": "finetune"}
    model = models.build_model(params, imagenet=False)
    scratch = models.build_model({"model": "resnet18", "resnet_mode": "scratch"})
    assert models.count_parameters(model) > models.count_parameters(scratch) // 2
    data = SimpleNamespace(classes=list(range(10)), input_shape=(1, 28, 28))
    counted = objective.architecture_size(params, data, flops=False)
    assert counted == {"parameter_count": models.count_parameters(model)}  # not {}


def test_in_place_relus_give_the_very_outputs_and_gradients_of_out_of_place_ones():
    """The CNN's ReLUs overwrite their input (a pass over memory less per layer); nothing its backward needs is lost:
    the same batch through a copy with out-of-place ReLUs gives bit-identical outputs and gradients, in bf16 too."""
    torch.manual_seed(0)
    params = dict(hparams.CLASSIC["cnn"], batch_norm=True, head="flatten", transition_ratio=0.5, dropout=0.0)
    model = models.build_model(params)
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    x = torch.randn(16, 1, 28, 28)
    for dtype in (torch.float32, torch.bfloat16):
        results = []
        for net in (model, plain):
            net.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = net(x)
            out.float().square().mean().backward()
            results.append((out, [p.grad for p in net.parameters()]))
        (out_a, grads_a), (out_b, grads_b) = results
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_a_channels_last_cnn_gets_its_gradient_back_channels_last_and_trains_bit_for_bit_as_before(head):
    """The flatten or mean hands back an NCHW gradient; it is laid out channels_last before the max-pool's backward
    (which would otherwise copy its input to NCHW and its result back), and the training is the same to the bit."""
    params = hparams.resolve_params({"model": "cnn", "cnn_channels": [8, 16], "pool": "every", "head": head,
                                     "head_units": 16, "batch_norm": True, "dropout": 0.0})
    torch.manual_seed(0)
    ours = models.build_model(params).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(ours)
    plain[-4] = nn.Flatten() if head == "flatten" else _PlainMean()
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    arrived = []
    for model in (ours, plain):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            features = model[:-4](x)  # the last max-pool's output: the flatten or mean comes next
            logits = model[-4:](features)
            features.register_hook(lambda grad: arrived.append(grad.is_contiguous(memory_format=torch.channels_last)))
            nn.functional.cross_entropy(logits, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert arrived == [True] * 3 + [False] * 3
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values(), strict=True))


class _PlainMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
