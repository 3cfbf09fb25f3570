"""Stand-in for comfy.clip_vision: ``ClipVisionModel.encode_image(image, crop=True)`` takes IMAGE
``[B, H, W, 3]`` in 0..1 and returns an output whose ``image_embeds`` is ``[B, D]``."""
import torch
from torch import nn


class Output:
    def __getitem__(self, key):
        return getattr(self, key)


class ClipVisionModel(nn.Module):
    def __init__(self, dim=16, size=16):
        super().__init__()
        self.size = size
        self.proj = nn.Linear(3 * size * size, dim)

    def encode_image(self, image, crop=True):
        pixels = torch.nn.functional.interpolate(image.movedim(-1, 1).float(), size=(self.size, self.size),
                                                 mode="bilinear", align_corners=False)
        out = Output()
        out.image_embeds = self.proj(pixels.flatten(1))
        return out
