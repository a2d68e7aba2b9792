"""Segmentation networks in torch: U-Net (2D and 3D), SegNet and FCN (2D).

Every network maps ``(N, in_channels, *spatial)`` float32 to logits
``(N, classes, *spatial)``. Spatial sizes must be multiples of
``NetSpec.multiple`` (inference pads tiles to that). Normalisation layers are
BatchNorm, which in eval mode is a per-channel affine map: a pixel's output
depends only on its neighbourhood, never on the tile it was cut from.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional

Arch = Literal["unet", "segnet", "fcn"]


class NetSpec(BaseModel):
    """Architecture and size of a network; stored beside its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: Arch = "unet"
    ndim: Literal[2, 3] = 2
    in_channels: int = Field(1, ge=1)
    classes: int = Field(3, ge=2)
    depth: int = Field(3, ge=1, le=6)
    """Number of 2× downsamplings."""
    width: int = Field(16, ge=1)
    """Channels of the first level; doubled at each level below."""

    @property
    def multiple(self) -> int:
        """Spatial sizes the network accepts are multiples of this."""
        return int(2**self.depth)

    @property
    def context(self) -> int:
        """Pixels per side beyond which an input barely changes a pixel's output.

        Half the theoretical receptive field: two 3-wide convolutions per level
        on the way down and up, each reaching ``2**level`` pixels per side.
        """
        reach = sum(2 * 2**level for level in range(self.depth + 1))  # encoder + bottom
        reach += sum(2 * 2**level for level in range(self.depth))  # decoder
        return max(self.multiple, reach // 2)


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _norm(ndim: int) -> type[nn.Module]:
    return nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d


def _double_conv(ndim: int, cin: int, cout: int) -> nn.Sequential:
    conv, norm = _conv(ndim), _norm(ndim)
    return nn.Sequential(
        conv(cin, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    """Upsample 2x, concatenate the encoder's features, convolve."""

    def __init__(self, ndim: int, cin: int, cout: int) -> None:
        super().__init__()
        up_conv = nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d
        self.up = up_conv(cin, cout, 2, stride=2)
        self.conv = _double_conv(ndim, 2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(torch.cat([self.up(x), skip], dim=1))
        return out


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with same-padded convolutions, 2D or 3D."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        nd, w = spec.ndim, spec.width
        widths = [w * 2**k for k in range(spec.depth + 1)]
        self.down = nn.ModuleList()
        cin = spec.in_channels
        for c in widths[:-1]:
            self.down.append(_double_conv(nd, cin, c))
            cin = c
        self.bottom = _double_conv(nd, widths[-2], widths[-1])
        self.up = nn.ModuleList(
            _Up(nd, widths[k + 1], widths[k]) for k in reversed(range(spec.depth))
        )
        self.head = _conv(nd)(widths[0], spec.classes, 1)
        self.pool = nn.MaxPool3d(2) if nd == 3 else nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for i, up in enumerate(self.up):
            x = up(x, skips[len(skips) - 1 - i])
        out: torch.Tensor = self.head(x)
        return out


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al. 2017): decoder upsamples with the encoder's pooling indices."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        if spec.ndim != 2:
            raise ValueError("segnet is 2D only; use unet for volumes.")
        widths = [spec.width * 2**k for k in range(spec.depth)]
        self.enc = nn.ModuleList()
        cin = spec.in_channels
        for c in widths:
            self.enc.append(_double_conv(2, cin, c))
            cin = c
        self.dec = nn.ModuleList()
        for k in reversed(range(spec.depth)):
            cout = widths[k - 1] if k > 0 else widths[0]
            self.dec.append(_double_conv(2, widths[k], cout))
        self.head = nn.Conv2d(widths[0], spec.classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices: list[torch.Tensor] = []
        for block in self.enc:
            x = block(x)
            x, idx = functional.max_pool2d_with_indices(x, [2, 2])
            indices.append(idx)
        for i, block in enumerate(self.dec):
            x = functional.max_unpool2d(x, indices[len(indices) - 1 - i], [2, 2])
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out


def _resize(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    return functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FCN(nn.Module):
    """Fully convolutional network (Long et al. 2015), FCN-8s style: class scores from the
    last three levels, each upsampled (bilinear) and summed with the next finer one."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        if spec.ndim != 2:
            raise ValueError("fcn is 2D only; use unet for volumes.")
        widths = [spec.width * 2**k for k in range(spec.depth + 1)]
        self.enc = nn.ModuleList()
        cin = spec.in_channels
        for c in widths:
            self.enc.append(_double_conv(2, cin, c))
            cin = c
        n_scores = min(3, spec.depth + 1)
        self.scores = nn.ModuleList(
            nn.Conv2d(widths[-1 - k], spec.classes, 1) for k in range(n_scores)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [x.shape[-2], x.shape[-1]]
        feats: list[torch.Tensor] = []
        for k, block in enumerate(self.enc):
            if k > 0:
                x = functional.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        out = torch.zeros(0)
        for k, score in enumerate(self.scores):
            finer = feats[len(feats) - 1 - k]
            here = [finer.shape[-2], finer.shape[-1]]
            out = score(finer) if k == 0 else _resize(out, here) + score(finer)
        return _resize(out, size)


def build(spec: NetSpec) -> nn.Module:
    """A freshly initialised network for ``spec``."""
    nets: dict[str, type[nn.Module]] = {"unet": UNet, "segnet": SegNet, "fcn": FCN}
    return nets[spec.arch](spec)


def network(**spec: object) -> nn.Module:
    """The network of a `NetSpec` given as keywords: the architecture a bioimage.io package's
    ``pytorch_state_dict`` weights name (``segpipe.deep.nets.network``)."""
    return build(NetSpec.model_validate(spec))
