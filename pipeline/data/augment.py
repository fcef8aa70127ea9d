"""Batched augmentation on the device: the digits' random affine (`Augment`) and the natural images'
crop, flip and colour jitter (`NaturalAugment`).

Each works on a whole float batch [B, C, H, W] in [0, 1] at once; every random parameter is drawn from
the caller's seeded CPU `torch.Generator` (only the small parameter tensors travel to the device), so
the same seed gives the same images bit for bit on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.spec.errors import DataError

# --------------------------------------------------------------------------------------------------
# Augmentation: a per-sample random affine (rotation, translation, scale), batched


@dataclass(frozen=True)
class Augment:
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.1  # fraction of the image size, per axis
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]

    @classmethod
    def from_strength(cls, strength: float) -> Augment | None:
        """One knob for searches: 1.0 is the classic (10 degrees, 10% shift, 10% zoom); 0 is off."""
        if strength < 0:
            raise DataError(f"augmentation strength {strength} must be >= 0 (0 turns it off)")
        if strength == 0:
            return None
        return cls(rotation=10.0 * strength, translate=0.1 * strength, scale=0.1 * strength)

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Warp float images [B, C, H, W] in [0, 1]; out-of-image pixels become background 0."""
        batch = images.shape[0]
        u = torch.rand(batch, 4, generator=generator, dtype=torch.float32) * 2 - 1  # uniform in [-1, 1]
        angle = u[:, 0] * math.radians(self.rotation)
        zoom = 1 + u[:, 1] * self.scale
        # affine_grid maps output coordinates to input coordinates in [-1, 1], hence 1/zoom and 2*shift.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, -sin, u[:, 2] * 2 * self.translate], dim=1),
                torch.stack([sin, cos, u[:, 3] * 2 * self.translate], dim=1),
            ],
            dim=1,
        ).to(images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Augmentation for natural images: random crop with padding, horizontal flip, mild colour jitter


@dataclass(frozen=True)
class NaturalAugment:
    """The classic recipe for photos (CIFAR-10's): pad and crop back at a random offset, flip half the images
    left-right, jitter brightness, contrast and (RGB) saturation. Strength 1: padding of an eighth of the
    image (4 px at 32), jitter of 20%."""

    padding: int = 4  # pixels per side
    flip: bool = True
    jitter: float = 0.2  # factors uniform in [1 - jitter, 1 + jitter]

    @classmethod
    def from_strength(cls, strength: float, image_size: int) -> NaturalAugment:
        return cls(padding=max(1, round(strength * image_size / 8)), flip=True, jitter=min(0.9, 0.2 * strength))

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Float images [B, C, H, W] in [0, 1]; the padding is a reflection of the border.

        Crop, padding and flip are one gather of source pixels, and the three jitters one colour matrix
        and offset per image: a handful of batched ops, whatever the batch size.
        """
        batch, channels, height, width = images.shape
        device = images.device
        p = self.padding
        draws = torch.rand(batch, 6, generator=generator, dtype=torch.float32).to(device)
        shifts = (draws[:, :2] * (2 * p + 1)).floor().clamp_(max=2 * p).to(torch.int64) - p  # in [-p, p]
        rows = torch.arange(height, device=device)[None, :] + shifts[:, :1]  # [B, H] rows of the source
        cols = torch.arange(width, device=device)[None, :].expand(batch, -1)
        if self.flip:  # crop, then mirror: output column j reads cropped column W - 1 - j
            cols = torch.where(draws[:, 2:3] < 0.5, cols.flip(1), cols)
        cols = cols + shifts[:, 1:]
        index = _reflect(rows, height)[:, :, None] * width + _reflect(cols, width)[:, None, :]  # [B, H, W]
        x = images.reshape(batch, channels, -1).gather(2, index.view(batch, 1, -1).expand(-1, channels, -1))
        if self.jitter > 0:
            # brightness b, contrast c around the image's mean luminance m, saturation s towards each pixel's
            # luminance: y = b c (s x + (1 - s) lum(x)) + (1 - c) b m, all per image.
            b, c, s = (1 + (draws[:, 3:] * 2 - 1) * self.jitter).unbind(1)
            if channels == 3:
                weights = torch.tensor([0.299, 0.587, 0.114], device=device)
                mean = (weights[None, :, None] * x).sum(1).mean(1)
                mix = s[:, None, None] * torch.eye(3, device=device) + (1 - s)[:, None, None] * weights
                x = torch.bmm((b * c)[:, None, None] * mix, x)
            else:
                mean = x.mean(dim=(1, 2))
                x = (b * c)[:, None, None] * x
            x = x + ((1 - c) * b * mean)[:, None, None]
        return x.view(batch, channels, height, width).clamp_(0.0, 1.0)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside [0, size) mirrored back in without repeating the edge (F.pad's "reflect")."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index).clamp_(0, size - 1)


def make_augment(policy: str, strength: float, image_size: int) -> Augment | NaturalAugment | None:
    """The augmentation a trial trains with: `policy` (resolved, not "auto") at `strength` (0: none)."""
    if policy == "digits":
        return Augment.from_strength(strength)  # checks the strength itself, as it always has
    if strength < 0:
        raise DataError(f"augmentation strength {strength} must be >= 0 (0 turns it off)")
    if policy == "natural" and strength > 0:
        return NaturalAugment.from_strength(strength, image_size)
    return None
