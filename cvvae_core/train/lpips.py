"""LPIPS (Zhang et al. 2018, "vgg" variant) in plain torch, from weights the user provides.

Nothing is downloaded: give the ImageNet VGG16 weights in the torchvision layout
(``features.N.weight`` / ``features.N.bias``; ``classifier.*`` is ignored) and the LPIPS linear
layers as the ``lpips`` package ships them (``lin0.model.1.weight`` .. ``lin4.model.1.weight``),
each as .safetensors, or as .pth/.pt read with ``torch.load(weights_only=True)`` (never unpickled).

Distance, as the ``lpips`` package computes it: inputs in [-1, 1] are shifted/scaled to the
ImageNet statistics, VGG16 features are taken after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, unit-normalised along channels, their squared difference is weighted per channel by the
linear layer, averaged over space and summed over the five layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointKeyError, CheckpointNotFoundError

#: torchvision vgg16().features: conv widths, "M" = max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: Indices in ``features`` after which LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """``torchvision.models.vgg16().features`` up to relu5_3, same indices (so the same keys)."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


class LinearLayer(nn.Module):
    """One LPIPS channel weighting, named as in the ``lpips`` package (``model.1`` is the conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """``lpips(x, y)`` -> ``[N]`` distances of ``[N, 3, H, W]`` images in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        self.lins = nn.ModuleList(LinearLayer(c) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0
        for a, b, lin in zip(fx, fy, self.lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean((1, 2, 3))
        return total


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"LPIPS weights {path} do not exist; give the file's path (nothing is "
                                      "downloaded) or use perceptual 'ssim'")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_lpips(vgg_path, lin_path) -> LPIPS:
    """A frozen LPIPS from the torchvision VGG16 file and the ``lpips`` linear-layer file."""
    model = LPIPS()
    vgg = {k: v for k, v in _read(vgg_path).items() if k.startswith("features.")}
    lin = {k.replace("lin", "lins.", 1): v for k, v in _read(lin_path).items() if k.startswith("lin")}
    got = {f"net.{k}": v for k, v in vgg.items()} | lin
    missing = sorted(set(model.state_dict()) - set(got))
    if missing:
        raise CheckpointKeyError(f"LPIPS weights lack {missing[:4]}{' ...' if len(missing) > 4 else ''}: give "
                                 f"torchvision's VGG16 (features.N.weight) as {vgg_path} and the lpips package's "
                                 f"linear layers (lin0.model.1.weight ...) as {lin_path}")
    shapes = model.state_dict()
    bad = [k for k in got if k in shapes and got[k].shape != shapes[k].shape]
    if bad:
        raise CheckpointKeyError(f"LPIPS weights of the wrong shape: {bad[:4]} (expected VGG16 and the 'vgg' "
                                 "LPIPS linear layers)")
    model.load_state_dict({k: got[k].float() for k in shapes})
    return model.eval().requires_grad_(False)
