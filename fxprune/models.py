"""Reference models for 32x32 inputs, built from code (no pretrained weights, no downloads).

CIFAR-style ResNets (He et al. 2016, section 4.2) and VGG-BN nets are the usual
benchmarks of the pruning papers fxprune reproduces; torchvision ships only the
ImageNet variants, so they are defined here. Every forward is free of
data-dependent Python control flow, so ``torch.fx.symbolic_trace`` works on all of them,
and ReLUs are out-of-place so that graph passes may insert nodes between a norm and
its activation without an in-place op overwriting a tensor another node still reads.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import torch
import torchvision
from torch import Tensor, nn

from fxprune.errors import ConfigError

__all__ = ["BasicBlock", "CifarResNet", "CifarVGG", "REFERENCE_MODELS", "SmallVGG", "build_model",
           "resnet20", "resnet56", "vgg8", "vgg11_bn", "vgg16_bn"]


def _kaiming_init(model: nn.Module) -> None:
    """torchvision's convention: Kaiming-normal convs (fan_out, ReLU), unit-scale/zero-shift norms.

    Linear layers keep PyTorch's default initialization, as torchvision's ResNets do.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Where the shape changes (stride 2 or more channels) the shortcut is a 1x1 conv + BN
    projection: option B of He et al. Option A (strided identity zero-padded with new
    channels) is not a channel-preserving op, so the channel analysis could not couple
    the block's input and output channels through it; a projection is an ordinary
    producer whose channels the analysis understands.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``blocks_per_stage`` BasicBlocks (16/32/64 channels), avg pool, fc.

    Depth is ``6 * blocks_per_stage + 2`` (ResNet-20: 3, ResNet-56: 9).
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages = []
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """Conv-BN-ReLU stacks with five 2x2 max-pools (32x32 -> 1x1), then flatten -> linear 512 -> classes.

    The single-linear classifier is the common CIFAR variant used by pruning papers;
    torchvision's 4096-wide ImageNet head would dominate the parameter count.
    """

    def __init__(self, config: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(item)), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


class SmallVGG(nn.Module):
    """VGG-8: three stages of two conv-BN-ReLU (32/64/128 channels) with a 2x2 max-pool after each,
    a global average pool, then linear 128 -> 128, ReLU, linear -> classes (about 0.3M parameters).

    The plain (residual-free) kind of network functionality-oriented pruning was shown on (VGG on
    CIFAR-10), small enough to train on this machine's CPUs; the global pool makes any input side
    >= 8 work (three pools), so 16x16 and 32x32 digits both fit.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, num_classes))
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def vgg8(num_classes: int = 10, in_channels: int = 3) -> SmallVGG:
    """CIFAR-style VGG-8 with batch norm: six convs, two linears (about 0.31M parameters)."""
    return SmallVGG(num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (about 0.27M parameters)."""
    return CifarResNet(3, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56 (about 0.85M parameters)."""
    return CifarResNet(9, num_classes, in_channels)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """CIFAR VGG-11 with batch norm (about 9.2M parameters)."""
    return CifarVGG(_VGG_CONFIGS["vgg11"], num_classes, in_channels)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """CIFAR VGG-16 with batch norm (about 14.7M parameters)."""
    return CifarVGG(_VGG_CONFIGS["vgg16"], num_classes, in_channels)


REFERENCE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg8": vgg8,
    "vgg11_bn": vgg11_bn,
    "vgg16_bn": vgg16_bn,
}


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """A freshly initialized model by name: a reference model here, else a torchvision classifier.

    Reference names win over torchvision's (``vgg11_bn`` here is the CIFAR variant).
    torchvision models are built with ``weights=None``: fxprune never downloads weights;
    load a state dict yourself if you need pretrained ones. Raises ``ConfigError`` for an
    unknown name or a ``weights`` argument.
    """
    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS[name](num_classes=num_classes, **kwargs)
    if "weights" in kwargs:
        raise ConfigError(
            f"build_model({name!r}) builds untrained models only (weights=None); "
            "load pretrained weights with model.load_state_dict(...) instead of passing 'weights'"
        )
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise ConfigError(
        f"unknown model {name!r}: reference models are {sorted(REFERENCE_MODELS)}; any torchvision "
        "classification model also works, see torchvision.models.list_models(module=torchvision.models)"
    )


def calibrate_batchnorm(model: nn.Module, batch: Tensor) -> None:
    """Set every BatchNorm's running statistics to exactly those of ``batch``; leaves the model in eval.

    Untrained models keep BN's default statistics, under which activations of deep nets shrink
    towards 0 and comparisons of outputs prove nothing; one calibration batch fixes that.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives exactly its statistics
        bn.train()
    if bns:
        with torch.no_grad():
            model(batch)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()


def model_from_spec(spec: str, num_classes: int) -> nn.Module:
    """The CLI's ``--model``: a reference or torchvision name (``build_model``), ``timm:<name>``
    (timm, an optional extra, with ``pretrained=False``), or ``package.module:factory`` — your own
    code, called as ``factory(num_classes=...)`` when it takes that argument, else ``factory()``.
    Raises ``ConfigError`` naming what could not be imported or built."""
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ConfigError(f"--model {spec} needs timm: pip install timm") from None
        try:
            return timm.create_model(spec[5:], pretrained=False, num_classes=num_classes)
        except RuntimeError as exc:  # timm's "Unknown model"
            raise ConfigError(f"--model {spec}: {exc}; see timm.list_models()") from None
    if ":" not in spec:
        return build_model(spec, num_classes=num_classes)
    path, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(path), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--model {spec}: cannot import {name!r} from {path!r} ({exc}); the module must be "
                          "importable from the current folder or PYTHONPATH") from None
    takes_classes = "num_classes" in inspect.signature(factory).parameters
    model = factory(num_classes=num_classes) if takes_classes else factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec}: {name}() returned a {type(model).__name__}, not an nn.Module")
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a ``state_dict`` file into ``model`` (also one saved under a "state_dict" or "model"
    key). Raises ``ConfigError`` for a missing or unreadable file, or keys and shapes that differ."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--checkpoint {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind
        raise ConfigError(f"--checkpoint {path} is not a state_dict file ({type(exc).__name__}: {exc}); save one "
                          "with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--checkpoint {path} does not fit --model: {str(exc).splitlines()[0][:300]}; build the "
                          "model with the arguments it was trained with (--num-classes)") from exc
