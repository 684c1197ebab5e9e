"""HoVLE-style vision front: patch embedding + position table -> pixel shuffle -> MLP -> image tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VISION_DEFAULTS = dict(image_size=448, patch_size=14, num_channels=3, downsample_ratio=0.5)


def vision_settings(vision_config: dict) -> dict:
    return {**VISION_DEFAULTS, **(vision_config or {})}


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL pixel shuffle (v2 layout): (n, w, h, c) -> (n, w*s, h*s, c/s^2)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class VisionFront(nn.Module):
    """pixel tiles (n, 3, S, S) -> tokens (n, (S/patch * ratio)^2, hidden)."""

    def __init__(self, config):
        super().__init__()
        v = vision_settings(config.vision_config)
        H, p, S = config.hidden_size, v["patch_size"], v["image_size"]
        self.patch_size, self.image_size, self.ratio = p, S, v["downsample_ratio"]
        self.patch_embedding = nn.Conv2d(v["num_channels"], H, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, (S // p) ** 2 + 1, H))  # slot 0: unused CLS
        inner = int(H / self.ratio**2)
        self.mlp = nn.Sequential(nn.Linear(inner, H), nn.GELU(), nn.Linear(H, H))

    @property
    def tokens_per_tile(self) -> int:
        return int((self.image_size // self.patch_size * self.ratio) ** 2)

    def _positions(self, gh: int, gw: int, dtype) -> torch.Tensor:
        side = self.image_size // self.patch_size
        pos = self.position_embedding[:, 1:]
        if (gh, gw) == (side, side):
            return pos.to(dtype)
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, gh * gw).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (n, H, gh, gw)
        n, H, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self._positions(gh, gw, x.dtype)
        x = pixel_shuffle(x.reshape(n, gh, gw, H), self.ratio)
        return self.mlp(x.reshape(n, -1, x.shape[-1]))
