"""Architecture from tensor shapes: what the weights of an LDM-layout VAE (2-D or 3-D) say about
its size. Shapes cannot tell the GroupNorm group count or the latent scale/shift: those come from
the file's metadata or config, or the loader's defaults."""
from __future__ import annotations

ENCODER_BLOCK = "encoder.down.{}.block.{}.conv1.weight"


def _count(shapes: dict, key: str, fixed: dict) -> int:
    n = 0
    while key.format(**{**fixed, "n": n}) in shapes:
        n += 1
    return n


def architecture(shapes: dict[str, tuple]) -> dict:
    """``in_channels``, ``base_channels``, ``channel_mult``, ``blocks_per_level`` and
    ``latent_channels`` of LDM-layout ``shapes`` (``encoder.conv_in.weight`` must be there)."""
    conv_in = shapes["encoder.conv_in.weight"]
    levels = _count(shapes, "encoder.down.{n}.block.0.conv1.weight", {})
    blocks = _count(shapes, "encoder.down.0.block.{n}.conv1.weight", {})
    base = conv_in[0]
    return {"in_channels": conv_in[1], "base_channels": base, "blocks_per_level": blocks,
            "channel_mult": tuple(shapes[ENCODER_BLOCK.format(i, 0)][0] // base for i in range(levels)),
            "latent_channels": shapes["decoder.conv_in.weight"][1] if "decoder.conv_in.weight" in shapes
            else conv_in[0]}
