"""MLP, CNN and ResNet-18 classifiers, each built from a plain dict of hyperparameters.

`MODEL_SPECS` lists every architecture key with its default; `build_model(params)` checks the dict,
builds the network for 1-channel 28x28 input, and refuses anything unknown or out of range before
a single weight exists. `describe(model)` gives the parameter count and FLOPs per image.

The classics are expressible as plain dicts (see `CLASSIC`): the 784-512-256-10 MLP with BatchNorm
and dropout 0.5, and the two-block 32/64-channel CNN with a 128-unit head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import BadInput
from pipeline.params import Bool, Choice, Float, Int, IntList, resolve

FAMILIES = ("mlp", "cnn", "resnet18")
RESNET_MODES = ("scratch", "finetune", "feature_extract")
IMAGE_SIZE = 28
IN_CHANNELS = 1

MODEL_SPECS = {
    "model": Choice("cnn", FAMILIES, "architecture family"),
    "activation": Choice("relu", ("relu", "gelu", "leaky_relu")),
    "batch_norm": Bool(True),
    "dropout": Float(0.0, 0.0, 1.0, high_open=True, help="before every fully connected layer"),
    # MLP: explicit widths, or depth x width shrinking by `mlp_taper` per layer.
    "mlp_widths": IntList((), help="hidden widths, e.g. [512, 256]; empty: from depth/width/taper"),
    "mlp_depth": Int(2, 1, 16),
    "mlp_width": Int(512, 8, 8192),
    "mlp_taper": Float(0.5, 0.0, 1.0, low_open=True, help="each hidden layer is this times the previous"),
    # CNN: blocks of 3x3 convolutions (+BatchNorm, activation), max-pooling, optional 1x1 transitions.
    "cnn_channels": IntList((), help="channels per block, e.g. [32, 64]; empty: from blocks/width/growth"),
    "cnn_blocks": Int(2, 1, 8),
    "cnn_width": Int(32, 4, 512),
    "cnn_growth": Float(2.0, 1.0, 4.0, help="channel multiplier from one block to the next"),
    "convs_per_block": Int(1, 1, 4),
    "pool": Choice("last", ("every", "alternate", "last", "none"), "which blocks end in a 2x2 max-pool"),
    "transition_ratio": Float(0.0, 0.0, 1.0, help="after each pool, a 1x1 conv to ratio x channels; 0: off"),
    "conv_dropout": Float(0.0, 0.0, 1.0, high_open=True, help="dropout after each pooled block"),
    "head": Choice("flatten", ("flatten", "gap"), "flatten + fully connected, or global average pooling"),
    "head_units": Int(128, 0, 8192, help="hidden units in the head; 0: straight to the classes"),
    # ResNet-18
    "resnet_mode": Choice("scratch", RESNET_MODES),
    "backbone_lr_scale": Float(0.1, 0.0, 1.0, low_open=True, help="fine-tuning: backbone lr = lr x this"),
}

CLASSIC: dict[str, dict[str, Any]] = {
    "mlp": {"model": "mlp", "mlp_widths": [512, 256], "batch_norm": True, "dropout": 0.5},
    # Two blocks of two 3x3 convs (32 then 64 channels), each block max-pooled, flatten -> 128 -> 10.
    "cnn": {"model": "cnn", "cnn_channels": [32, 64], "convs_per_block": 2, "pool": "every", "head": "flatten",
            "head_units": 128, "conv_dropout": 0.0, "dropout": 0.25},
    "resnet18": {"model": "resnet18", "resnet_mode": "scratch"},
}


def model_params(params: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys of `params`, checked and completed with defaults."""
    return resolve(MODEL_SPECS, {k: v for k, v in params.items() if k in MODEL_SPECS}, "model parameters")


class GlobalAvgPool(nn.Module):
    """Mean over height and width -> [B, C].

    Used instead of nn.AdaptiveAvgPool2d because that op's CUDA backward has no deterministic
    implementation, so deterministic mode would refuse to train with it on a GPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": lambda: nn.LeakyReLU(0.01)}[name]()


def _fully_connected(widths: list[int], num_classes: int, p: dict[str, Any]) -> list[nn.Module]:
    """Linear -> [BatchNorm] -> activation -> [dropout] per hidden width, then the classifier."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        layers.append(nn.Linear(fan_in, fan_out, bias=not p["batch_norm"]))
        if p["batch_norm"]:
            layers.append(nn.BatchNorm1d(fan_out))
        layers.append(_activation(p["activation"]))
        if p["dropout"] > 0:
            layers.append(nn.Dropout(p["dropout"]))
    layers.append(nn.Linear(widths[-1], num_classes))
    return layers


def mlp_widths(p: dict[str, Any]) -> list[int]:
    if p["mlp_widths"]:
        return list(p["mlp_widths"])
    return [max(8, round(p["mlp_width"] * p["mlp_taper"] ** i)) for i in range(p["mlp_depth"])]


def build_mlp(p: dict[str, Any], num_classes: int) -> nn.Module:
    widths = [IN_CHANNELS * IMAGE_SIZE * IMAGE_SIZE, *mlp_widths(p)]
    return nn.Sequential(nn.Flatten(), *_fully_connected(widths, num_classes, p))


def cnn_channels(p: dict[str, Any]) -> list[int]:
    if p["cnn_channels"]:
        return list(p["cnn_channels"])
    return [min(1024, round(p["cnn_width"] * p["cnn_growth"] ** i)) for i in range(p["cnn_blocks"])]


def _conv_bn_act(c_in: int, c_out: int, kernel: int, p: dict[str, Any]) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=not p["batch_norm"])]
    if p["batch_norm"]:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(_activation(p["activation"]))
    return layers


def build_cnn(p: dict[str, Any], num_classes: int) -> nn.Module:
    """Blocks of 3x3 convs ('same' padding) with a 2x2 max-pool where `pool` says.

    A pool that would shrink the map below 3x3 is skipped, so any block count stays buildable.
    """
    channels = cnn_channels(p)
    pooled_blocks = {
        "every": set(range(len(channels))),
        "alternate": set(range(1, len(channels), 2)),
        "last": {len(channels) - 1},
        "none": set(),
    }[p["pool"]]
    layers: list[nn.Module] = []
    c_in, size = IN_CHANNELS, IMAGE_SIZE
    for block, c_out in enumerate(channels):
        for conv in range(p["convs_per_block"]):
            layers += _conv_bn_act(c_in if conv == 0 else c_out, c_out, 3, p)
        c_in = c_out
        if block in pooled_blocks and size // 2 >= 3:
            layers.append(nn.MaxPool2d(2))
            size //= 2
            if p["transition_ratio"] > 0:
                c_in = max(8, round(c_out * p["transition_ratio"]))
                layers += _conv_bn_act(c_out, c_in, 1, p)
            if p["conv_dropout"] > 0:
                layers.append(nn.Dropout(p["conv_dropout"]))
    if p["head"] == "gap":
        layers.append(GlobalAvgPool())
        features = c_in
    else:
        layers.append(nn.Flatten())
        features = c_in * size * size
    widths = [features, p["head_units"]] if p["head_units"] else [features]
    # The head's hidden layer carries dropout; BatchNorm there would fight it, so it has none.
    head = _fully_connected(widths, num_classes, dict(p, batch_norm=False))
    if p["dropout"] > 0 and not p["head_units"]:
        head.insert(0, nn.Dropout(p["dropout"]))
    return nn.Sequential(*layers, *head)


# --------------------------------------------------------------------------------------------------
# ResNet-18


def resnet18_weights_path() -> Path:
    """Where torch's cache keeps torchvision's ImageNet ResNet-18 weights (honours TORCH_HOME)."""
    from torchvision.models import ResNet18_Weights

    file_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


class ResNet18Classifier(nn.Module):
    """torchvision's ResNet-18 adapted to 1x28x28 input: no stride or max-pool in the stem.

    From scratch the stem is a 3x3 conv (the usual small-image adaptation). With ImageNet weights it
    keeps the pretrained 7x7 kernel, summed over RGB, so the pretrained filters still apply to gray.
    In feature extraction the backbone is frozen and stays in eval mode (its BatchNorm statistics
    are ImageNet's); only the new head trains.
    """

    def __init__(self, mode: str, num_classes: int, dropout: float):
        super().__init__()
        from torchvision.models import resnet18

        backbone = resnet18(weights=None)
        if mode == "scratch":
            backbone.conv1 = nn.Conv2d(IN_CHANNELS, 64, 3, stride=1, padding=1, bias=False)
        else:
            state = load_imagenet_resnet18()
            backbone.load_state_dict(state)
            conv1 = nn.Conv2d(IN_CHANNELS, 64, 7, stride=1, padding=3, bias=False)
            with torch.no_grad():
                conv1.weight.copy_(state["conv1.weight"].sum(dim=1, keepdim=True))
            backbone.conv1 = conv1
        backbone.maxpool = nn.Identity()
        backbone.avgpool = GlobalAvgPool()  # deterministic on CUDA, unlike AdaptiveAvgPool2d
        backbone.fc = nn.Identity()
        self.mode = mode
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(512, num_classes))
        if mode == "feature_extract":
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet18Classifier:
        super().train(mode)
        if self.mode == "feature_extract":
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def load_imagenet_resnet18() -> dict[str, torch.Tensor]:
    path = resnet18_weights_path()
    if not path.is_file():
        from torchvision.models import ResNet18_Weights

        raise BadInput(
            f"ImageNet ResNet-18 weights not found at {path}; download {ResNet18_Weights.IMAGENET1K_V1.url} "
            f"on a machine with internet and copy it there (TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}), "
            "or use resnet_mode='scratch'"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"{path}: not a readable ResNet-18 state dict ({exc}); delete it and copy it again") from None


# --------------------------------------------------------------------------------------------------


def build_model(params: dict[str, Any], num_classes: int = 10) -> nn.Module:
    """Build the network that `params` describes (other keys in `params` are ignored here)."""
    p = model_params(params)
    if p["model"] == "mlp":
        return build_mlp(p, num_classes)
    if p["model"] == "cnn":
        return build_cnn(p, num_classes)
    return ResNet18Classifier(p["resnet_mode"], num_classes, p["dropout"])


def parameter_groups(model: nn.Module, params: dict[str, Any], lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: no weight decay on biases and norm weights (1-d tensors), and the backbone of a
    fine-tuned ResNet at `backbone_lr_scale` x lr. Frozen parameters are left out."""
    p = model_params(params)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group_lr = lr
        if isinstance(model, ResNet18Classifier) and p["resnet_mode"] == "finetune" and name.startswith("backbone."):
            group_lr = lr * p["backbone_lr_scale"]
        decay = weight_decay if param.ndim > 1 else 0.0
        groups.setdefault((group_lr, decay), []).append(param)
    return [{"params": ps, "lr": g_lr, "initial_lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs for one image as torch's FlopCounterMode counts them (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
