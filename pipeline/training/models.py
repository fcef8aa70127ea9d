"""MLP, CNN and ResNet-18 classifiers, each built from a plain dict of hyperparameters.

`hparams.MODEL_SPECS` lists every architecture key with its default; `build_model(params, num_classes,
input_shape)` checks the dict, builds the network for the data's channels and image size (1x28x28
unless told), and refuses anything unknown, out of range or unable to fit the image before a single
weight exists. `count_parameters` and `flops_per_image` describe the result.

The classics are expressible as plain dicts (see `hparams.CLASSIC`): the 784-512-256-10 MLP with
BatchNorm and dropout 0.5, and the two-block 32/64-channel CNN with a 128-unit head.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.spec.errors import BadInput, ParamError
from pipeline.spec.hparams import model_params

DEFAULT_INPUT_SHAPE = (1, 28, 28)  # channels, height, width: the digit datasets'
SMALL_IMAGE = 64  # ResNet-18 keeps full resolution in its stem (3x3 or stride-1 conv, no max-pool) up to this size
MAX_FLAT_FEATURES = 1 << 21  # a flatten head over more features than this would be mostly one huge matrix
# torchvision's ImageNet weights expect RGB normalised with these (torchvision's transforms for the weights).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def keep_gradient_channels_last(x: torch.Tensor) -> None:
    """Have the gradient that comes back into a channels_last activation `x` arrive channels_last.

    A flatten or a mean hands back an NCHW gradient; the max-pool, ReLU or BatchNorm backward before it, given that
    gradient beside a channels_last input, copies its input to NCHW and its own result back to channels_last: two
    passes over the big activation. Laying out the small gradient here is one pass over it, and the values are the
    same (a copy), so a run trains bit for bit as before.
    """
    channels_last_only = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last_only and x.requires_grad and not torch.compiler.is_compiling():
        x.register_hook(_channels_last)


class Flatten(nn.Flatten):
    """nn.Flatten whose gradient goes back channels_last when its input was (keep_gradient_channels_last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep_gradient_channels_last(x)
        return super().forward(x)


class GlobalAvgPool(nn.Module):
    """Mean over height and width -> [B, C].

    Used instead of nn.AdaptiveAvgPool2d because that op's CUDA backward has no deterministic
    implementation, so deterministic mode would refuse to train with it on a GPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep_gradient_channels_last(x)
        return x.mean(dim=(2, 3))


def _activation(name: str) -> nn.Module:
    # ReLU overwrites its input: every layer before one (Linear, conv, BatchNorm) keeps what its backward needs
    # itself, and a training step saves an allocation and a pass over memory per ReLU.
    makers: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU,
                                                  "leaky_relu": lambda: nn.LeakyReLU(0.01)}
    return makers[name]()


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


def build_mlp(p: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    channels, height, width = input_shape
    _check_flat("mlp_widths", channels * height * width)
    widths = [channels * height * width, *mlp_widths(p)]
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


def _check_flat(key: str, features: int) -> None:
    if features > MAX_FLAT_FEATURES:
        raise ParamError(f"parameters: {key}: the image flattens to {features:,} features, more than "
                         f"{MAX_FLAT_FEATURES:,}; use head = \"gap\" or more pooling (pool = \"every\"), or a smaller "
                         "dataset.image_size")


def build_cnn(p: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
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
    c_in, height, width = input_shape
    if min(height, width) < 3:
        raise ParamError(f"parameters: model: {input_shape[1]}x{input_shape[2]} images are too small for a CNN; "
                         "use dataset.image_size >= 3")
    for block, c_out in enumerate(channels):
        for conv in range(p["convs_per_block"]):
            layers += _conv_bn_act(c_in if conv == 0 else c_out, c_out, 3, p)
        c_in = c_out
        if block in pooled_blocks and min(height, width) // 2 >= 3:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
            if p["transition_ratio"] > 0:
                c_in = max(8, round(c_out * p["transition_ratio"]))
                layers += _conv_bn_act(c_out, c_in, 1, p)
            if p["conv_dropout"] > 0:
                layers.append(nn.Dropout(p["conv_dropout"]))
    if p["head"] == "gap":
        layers.append(GlobalAvgPool())
        features = c_in
    else:
        layers.append(Flatten())
        features = c_in * height * width
        _check_flat("head", features)
    widths = [features, p["head_units"]] if p["head_units"] else [features]
    # The head's hidden layer carries dropout; BatchNorm there would fight it, so it has none.
    head = _fully_connected(widths, num_classes, dict(p, batch_norm=False))
    if p["dropout"] > 0 and not p["head_units"]:
        head.insert(0, nn.Dropout(p["dropout"]))
    return nn.Sequential(*layers, *head)


# --------------------------------------------------------------------------------------------------
# ResNet-18


def _imagenet_weights_url() -> str:
    from torchvision.models import ResNet18_Weights  # here: importing torchvision takes a second; only ResNets need it

    return ResNet18_Weights.IMAGENET1K_V1.url


def resnet18_weights_path() -> Path:
    """Where torch's cache keeps torchvision's ImageNet ResNet-18 weights (honours TORCH_HOME)."""
    file_name = _imagenet_weights_url().rsplit("/", 1)[1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


class Resize(nn.Module):
    """Images resized to size x size on the device (bilinear). Only inputs pass through it, which never need a
    gradient, so interpolate's non-deterministic CUDA backward never runs."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)


class ImageNetInput(nn.Module):
    """Turns the pipeline's input (normalised with the dataset's statistics) into what ImageNet weights
    expect: pixels back in [0, 1], gray repeated to RGB, resized to `size` on the device, then normalised
    with ImageNet's mean and std. Part of the model, so exports take the same input as every other model."""

    # Buffers (registered below): declared so that they read as tensors, not as nn.Module's attribute fallback.
    data_mean: torch.Tensor
    data_std: torch.Tensor
    imagenet_mean: torch.Tensor
    imagenet_std: torch.Tensor

    def __init__(self, data_mean: tuple[float, ...], data_std: tuple[float, ...], size: int):
        super().__init__()
        channels = len(data_mean)
        # Not persistent: derived from the data's statistics, so state dicts stay plain weights.
        self.register_buffer("data_mean", torch.tensor(data_mean).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("data_std", torch.tensor(data_std).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.resize: nn.Module = Resize(size) if size else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.data_std + self.data_mean
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (self.resize(x) - self.imagenet_mean) / self.imagenet_std


class ResNet18Classifier(nn.Module):
    """torchvision's ResNet-18 for the data's channels, size and classes.

    Images up to SMALL_IMAGE px keep their resolution through the stem (no stride, no max-pool): from
    scratch the stem is a 3x3 conv (the usual small-image adaptation), with ImageNet weights the
    pretrained 7x7 conv at stride 1. Larger images get torchvision's own stem. With ImageNet weights the
    input passes through `ImageNetInput` (ImageNet statistics, RGB, `input_size`). In feature extraction
    the backbone is frozen and stays in eval mode (its BatchNorm statistics are ImageNet's); only the new
    head trains. Fine-tuning may start the same way (`freeze_backbone`) and unfreeze later.
    """

    def __init__(self, mode: str, num_classes: int, dropout: float,
                 input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE, input_size: int = 0,
                 input_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None, imagenet: bool = True):
        super().__init__()
        from torchvision.models import resnet18  # here: importing torchvision takes a second; only ResNets need it

        channels = input_shape[0]
        size = input_size or max(input_shape[1:])
        if min(input_shape[1:]) < 8 and not input_size:
            raise ParamError(f"parameters: model: ResNet-18 needs images of at least 8x8, these are "
                             f"{input_shape[1]}x{input_shape[2]}; set input_size (e.g. 32) to resize them")
        backbone = resnet18(weights=None)
        self.input: nn.Module = nn.Identity()
        if mode == "scratch":
            if size <= SMALL_IMAGE:
                backbone.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            elif channels != 3:
                backbone.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
            if input_size:
                self.input = Resize(input_size)
        else:
            if imagenet:
                backbone.load_state_dict(load_imagenet_resnet18())
            if size <= SMALL_IMAGE:
                backbone.conv1.stride = (1, 1)
            if input_stats is None:
                input_stats = ((0.5,) * channels, (0.5,) * channels)
            self.input = ImageNetInput(*input_stats, input_size)
        if size <= SMALL_IMAGE:
            backbone.maxpool = nn.Identity()
        backbone.avgpool = GlobalAvgPool()  # deterministic on CUDA, unlike AdaptiveAvgPool2d
        backbone.fc = nn.Identity()
        self.mode = mode
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(512, num_classes))
        self.backbone_frozen = False
        if mode == "feature_extract":
            self.freeze_backbone(True)

    def freeze_backbone(self, frozen: bool) -> None:
        """Train the head alone (backbone weights fixed, its BatchNorm statistics kept) or the whole network."""
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()

    def train(self, mode: bool = True) -> ResNet18Classifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's 512 features per image (what feature extraction trains the head on)."""
        return self.backbone(self.input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_imagenet_resnet18() -> dict[str, torch.Tensor]:
    path = resnet18_weights_path()
    if not path.is_file():
        raise BadInput(
            f"ImageNet ResNet-18 weights not found at {path}; download {_imagenet_weights_url()} "
            f"on a machine with internet and copy it there (TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}), "
            "or use resnet_mode='scratch'"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"{path}: not a readable ResNet-18 state dict ({exc}); delete it and copy it again") from None


# --------------------------------------------------------------------------------------------------


def build_model(params: dict[str, Any], num_classes: int = 10,
                input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE,
                input_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                imagenet: bool = True) -> nn.Module:
    """Build the network that `params` describes for images of `input_shape` (other keys in `params` are
    ignored here). `input_stats` (the data's mean and std per channel) lets a pretrained ResNet undo the
    data's normalisation and apply ImageNet's. `imagenet=False` leaves a pretrained ResNet's backbone
    untrained, for a caller that loads all the weights itself (no ImageNet weights file needed)."""
    p = model_params(params)
    channels, height, width = input_shape  # config.json gives a list
    input_shape = (channels, height, width)
    if p["model"] == "mlp":
        return build_mlp(p, num_classes, input_shape)
    if p["model"] == "cnn":
        return build_cnn(p, num_classes, input_shape)
    return ResNet18Classifier(p["resnet_mode"], num_classes, p["dropout"], input_shape, p["input_size"], input_stats,
                              imagenet)


def read_state_dict(path: Path, name: str, fix: str) -> dict[str, torch.Tensor]:
    """A plain state dict (names -> tensors) from a file that may come from anyone.

    torch's weights-only unpickler builds tensors and plain containers and refuses everything else, so
    nothing in the file can run code. `name` says what the file is in messages; `fix` what to do instead.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message spans lines and suggests weights_only=False; keep only what it refused.
        refused = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(exc))
        detail = refused.group(1) if refused else " ".join(str(exc).split())[:300]
        raise BadInput(f"{name}: not a plain state dict of tensors, refused by torch's weights-only reader "
                       f"({type(exc).__name__}: {detail}); {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise BadInput(f"{name}: holds a {type(state).__name__}, not a state dict of named tensors; {fix}")
    return state


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


def flops_per_image(model: nn.Module, input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE) -> int:
    """Forward FLOPs for one image as torch's FlopCounterMode counts them (a multiply-add is 2)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
