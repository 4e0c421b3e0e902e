"""Small models in the style of real detection / segmentation / attention code bases.

Each one uses a construct that plain ``torch.fx.symbolic_trace`` rejects but that is fixed
once the example inputs are known: ``*args``/``**kwargs`` in the root forward, ``list(t.chunk())``,
caches keyed on ``x.shape``, sizes unpacked from ``x.shape`` feeding ``view``, asserts on
divisible input sizes, optional skips tested with ``skip.shape[1]``. They are written for these
tests (in the manner of ultralytics, mmdet and segmentation_models_pytorch, not copied), with
8-32 channels so that every test stays cheap.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


# ---- (a) a YOLO-style detector -------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split in two, run bottlenecks on the last piece, concatenate every piece."""

    def __init__(self, c_in: int, c_out: int, n: int = 2, shortcut: bool = True):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBNAct(c_in, 2 * self.c)
        self.cv2 = ConvBNAct((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def make_anchors(feats: list[torch.Tensor], strides: list[int],
                 offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres and strides of every feature-map cell (from the shapes only)."""
    points, stride_tensor = [], []
    for f, s in zip(feats, strides):
        _, _, h, w = f.shape
        sx = torch.arange(w, device=f.device, dtype=f.dtype) + offset
        sy = torch.arange(h, device=f.device, dtype=f.dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), s, dtype=f.dtype, device=f.device))
    return torch.cat(points), torch.cat(stride_tensor)


class DetectHead(nn.Module):
    """Box and class branches per level; anchors are cached and rebuilt when the input shape changes."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...], num_classes: int = 3):
        super().__init__()
        self.nc, self.strides = num_classes, list(strides)
        self.box = nn.ModuleList(nn.Sequential(ConvBNAct(c, 16, 3), nn.Conv2d(16, 4, 1)) for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(ConvBNAct(c, 16, 3), nn.Conv2d(16, num_classes, 1)) for c in channels)
        self.shape: torch.Size | None = None
        self.anchors = torch.empty(0)
        self.stride_tensor = torch.empty(0)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        shape = feats[0].shape
        b = shape[0]
        outs = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.box, self.cls)]
        if self.shape != shape:
            self.anchors, self.stride_tensor = make_anchors(feats, self.strides)
            self.shape = shape
        y = torch.cat([o.view(b, 4 + self.nc, -1) for o in outs], 2)
        box, cls = y.split((4, self.nc), 1)
        lt, rb = box.chunk(2, 1)
        centres = self.anchors.transpose(0, 1).unsqueeze(0)
        x1y1, x2y2 = centres - lt, centres + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.stride_tensor.transpose(0, 1)
        return torch.cat((boxes, cls.sigmoid()), 1)


class TinyDetector(nn.Module):
    """``forward(x, *args, **kwargs)`` hands its extra arguments to a helper, as detectors do."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2)
        self.stage1 = nn.Sequential(ConvBNAct(8, 16, 3, 2), C2f(16, 16))
        self.stage2 = nn.Sequential(ConvBNAct(16, 32, 3, 2), C2f(32, 32))
        self.head = DetectHead((16, 32), (4, 8))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._predict(x, *args, **kwargs)

    def _predict(self, x: torch.Tensor, *args, augment: bool = False, **kwargs) -> torch.Tensor:
        if augment:
            raise NotImplementedError("test-time augmentation")
        p1 = self.stage1(self.stem(x))
        p2 = self.stage2(p1)
        return self.head([p1, p2])


# ---- (b) a self-attention block ------------------------------------------------------------------
class SpatialAttention(nn.Module):
    """Non-local attention over the H*W positions, sizes read from ``x.shape``."""

    def __init__(self, c: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q = nn.Conv2d(c, c // 2, 1)
        self.k = nn.Conv2d(c, c // 2, 1)
        self.v = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C % self.heads != 0:
            raise ValueError(f"{C} channels do not split into {self.heads} heads")
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q.view(B, -1, H * W).transpose(1, 2) @ k.view(B, -1, H * W), dim=-1)
        y = (v.view(B, C, H * W) @ attn.transpose(1, 2)).view(B, C, H, W)
        return x + y


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2)
        self.attn = SpatialAttention(16)
        self.mid = ConvBNAct(16, 24, 3, 2)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.attn(self.stem(x))))


# ---- (c) a U-Net-style segmentation model ----------------------------------------------------------
class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.conv1 = ConvBNAct(c_in + c_skip, c_out, 3)
        self.conv2 = ConvBNAct(c_out, c_out, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None and skip.shape[1] != 0:
            x = torch.cat([x, skip], 1)
        return self.conv2(self.conv1(x))


class TinyUNet(nn.Module):
    """Rejects inputs whose sides are not multiples of the output stride, like real segmenters."""

    output_stride = 32

    def __init__(self, num_classes: int = 3):
        super().__init__()
        widths = (8, 16, 16, 24, 32)
        self.encoder = nn.ModuleList(
            ConvBNAct(c_in, c_out, 3, 2) for c_in, c_out in zip((3,) + widths[:-1], widths)
        )
        self.decoder = nn.ModuleList([
            DecoderBlock(32, 24, 24), DecoderBlock(24, 16, 16), DecoderBlock(16, 16, 16),
            DecoderBlock(16, 8, 8), DecoderBlock(8, 0, 8),
        ])
        self.segmentation_head = nn.Conv2d(8, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.output_stride != 0 or w % self.output_stride != 0:
            raise ValueError(f"input size {h}x{w} is not divisible by {self.output_stride}")
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        skips = features[-2::-1] + [None]
        x = features[-1]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return self.segmentation_head(x)


# ---- (d) keyword-only options, sizes computed from .size(), loops over split pieces ---------------
class SplitMix(nn.Module):
    """Splits the channels in quarter/rest with sizes read from ``x.size(1)`` and loops over the
    pieces (ESPNet / Res2Net style)."""

    def __init__(self, c: int):
        super().__init__()
        q = c // 4
        self.convs = nn.ModuleList([ConvBNAct(q, q, 3), ConvBNAct(c - q, c - q, 3)])
        self.fuse = ConvBNAct(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expects NCHW")
        c = x.size(1)
        pieces = torch.split(x, [c // 4, c - c // 4], dim=1)
        outs = []
        for piece, conv in zip(pieces, self.convs):
            outs.append(conv(piece))
        assert len(outs) == len(pieces)
        return self.fuse(torch.cat(outs, 1)) + x


class KeywordOnlyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2)
        self.mix = SplitMix(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor, *, upsample: bool = False, **options) -> torch.Tensor:
        y = self.head(self.mix(self.stem(x)))
        if upsample:
            y = F.interpolate(y, size=x.shape[-2:])
        return y


# ---- a YOLOv5-style head: a list cache and slice assignment ----------------------------------------------
class GridDetect(nn.Module):
    """Keeps one grid per level in a list, rebuilt when a level's size changes, and decodes in
    place with ``y[..., :2] = ...``. Item assignment cannot be recorded, so the head stays an
    opaque leaf; its list cache must not keep what tracing put there."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...], outputs: int = 6):
        super().__init__()
        self.no, self.strides = outputs, strides
        self.m = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in channels)
        self.grid = [torch.empty(0) for _ in channels]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        z = []
        for i, f in enumerate(feats):
            y = self.m[i](f)
            b, _, ny, nx = y.shape
            y = y.view(b, self.no, ny * nx).transpose(1, 2).sigmoid()
            if self.grid[i].shape[0] != ny * nx:
                gy, gx = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
                self.grid[i] = torch.stack((gx, gy), -1).view(-1, 2).float()
            y[..., :2] = (y[..., :2] * 2 - 0.5 + self.grid[i]) * self.strides[i]
            z.append(y)
        return torch.cat(z, 1)


class GridDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2)
        self.p1 = ConvBNAct(16, 16, 3, 2)
        self.p2 = ConvBNAct(16, 24, 3, 2)
        self.detect = GridDetect((16, 24), (4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = self.p1(self.stem(x))
        return self.detect([p1, self.p2(p1)])


# ---- value-dependent control flow: still a leaf or a TraceError --------------------------------------
class ClampIfLarge(nn.Module):
    """Branches on a tensor value: cannot be specialised, so it stays an opaque leaf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 10:
            x = x / 10
        return x


class Squeeze(nn.Module):
    """Reads a tensor value into Python (``.item()``) and uses it as a size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int((x > 0).sum().item()) % 2 + 1
        return x[:, : x.shape[1] // n].repeat(1, n, 1, 1)


class ShapeAndValueBranches(nn.Module):
    """Shape control flow at the root (traced) around two value-dependent submodules (leaves)."""

    def __init__(self):
        super().__init__()
        self.c1 = ConvBNAct(3, 8, 3)
        self.clamp = ClampIfLarge()
        self.c2 = ConvBNAct(8, 16, 3)
        self.c3 = ConvBNAct(16, 8, 3)
        self.squeeze = Squeeze()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("square inputs only")
        return self.head(self.squeeze(self.c3(self.c2(self.clamp(self.c1(x))))))


class ItemAtRoot(nn.Module):
    """A root forward that turns a tensor value into a Python int: untraceable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = int(x.abs().mean().item() * 3)
        for _ in range(steps):
            x = x * 0.5
        return self.conv(x)


class VarArgsSum(nn.Module):
    """Extra positional example inputs bind to ``*rest``; iterating it is plain Python."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        for r in rest:
            x = x + r
        return self.head(torch.relu(self.conv(x * scale)))
