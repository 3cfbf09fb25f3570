"""State-dict names: the diffusers ``AutoencoderKL`` layout <-> the LDM layout this package's modules use.

One table of corresponding name prefixes, read in both directions; the inverse is generated from it,
never written out. It serves the SD3 CV-VAE release (``vae3d_sd3``, diffusers names around 3-D
convolutions) and diffusers image VAE files alike. The LDM layout is the official SD-variant
CV-VAE's (``vae3d``) and ComfyUI's: ``encoder.down.{i}.block.{j}``, ``decoder.up.{i}``,
``mid.attn_1.q``. Diffusers counts decoder levels from the top (``up_blocks.0`` is LDM's last
``up``), stores attention projections as ``nn.Linear`` ``[C, C]`` (LDM: 1x1 convolutions) and, in
the 3-D model, the shortcut as a 2-D 1x1 convolution.
"""
from __future__ import annotations

import re

import torch

# (LDM name prefix, diffusers name prefix). Fields: {i}, {j} numbers; {up} the LDM decoder level
# of diffusers' up block {i} (levels - 1 - i); {part} encoder or decoder.
PREFIXES = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{up}.block.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ("decoder.up.{up}.upsample.", "decoder.up_blocks.{i}.upsamplers.0."),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0."),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1."),
    ("{part}.mid.attn_1.norm.", "{part}.mid_block.attentions.0.group_norm."),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.to_q."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.to_k."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.to_v."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.to_out.0."),
    ("{part}.norm_out.", "{part}.conv_norm_out."),
]
#: Older diffusers files name the attention projections query/key/value/proj_attn (read, never written).
LEGACY_DIFFUSERS = [
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.query."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.key."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.value."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.proj_attn."),
]
#: Renamed wherever it occurs in a name.
INFIXES = [(".nin_shortcut.", ".conv_shortcut.")]

_FIELD = re.compile(r"\{(\w+)\}")
_ATTN_PROJECTION = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")
_FLIPPED = {"up": "i", "i": "up"}


def _compile(template: str) -> re.Pattern:
    parts = _FIELD.split(template)
    return re.compile("^" + "".join(re.escape(p) if k % 2 == 0 else
                                    f"(?P<{p}>{'encoder|decoder' if p == 'part' else '[0-9]+'})"
                                    for k, p in enumerate(parts)))


def _rules(pairs, source: int) -> list[tuple[re.Pattern, str]]:
    return [(_compile(pair[source]), pair[1 - source]) for pair in pairs]


_TO_LDM = _rules(PREFIXES + LEGACY_DIFFUSERS, source=1)
_TO_DIFFUSERS = _rules(PREFIXES, source=0)


def _rename(key: str, rules, infixes, levels: int) -> str:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            values = m.groupdict()
            for name in _FIELD.findall(target):
                if name not in values:  # the decoder level, counted from the other end
                    values[name] = str(levels - 1 - int(values[_FLIPPED[name]]))
            key = target.format(**values) + key[m.end():]
            break
    for old, new in infixes:
        key = key.replace(old, new)
    return key


def ldm_name(key: str, levels: int) -> str:
    """The LDM name of a diffusers-layout key (``levels``: the model's resolution levels)."""
    return _rename(key, _TO_LDM, [(d, l) for l, d in INFIXES], levels)


def diffusers_name(key: str, levels: int) -> str:
    """The diffusers name of an LDM-layout key."""
    return _rename(key, _TO_DIFFUSERS, INFIXES, levels)


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith("encoder.down_blocks.") for k in keys)


def levels_of(keys) -> int:
    """Resolution levels of a state dict in either layout (its encoder's down blocks)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k))}
    return 1 + max(found) if found else 0


def to_ldm(sd: dict, video: bool) -> dict:
    """A diffusers-layout state dict renamed to the LDM layout, tensors reshaped to this package's
    modules (``video``: the 3-D model, whose shortcuts diffusers stores as 2-D 1x1 convolutions)."""
    levels = levels_of(sd)
    out = {}
    for key, t in sd.items():
        name = ldm_name(key, levels)
        if _ATTN_PROJECTION.search(name) and t.dim() == 2:
            t = t[:, :, None, None]
        elif video and name.endswith("nin_shortcut.weight") and t.dim() == 4:
            t = t[..., None]
        out[name] = t
    return out


def to_diffusers(sd: dict, video: bool) -> dict:
    """The inverse of :func:`to_ldm`."""
    levels = levels_of(sd)
    out = {}
    for name, t in sd.items():
        if _ATTN_PROJECTION.search(name):
            t = t.flatten(1)
        elif video and name.endswith("nin_shortcut.weight"):
            t = t[..., 0]
        out[diffusers_name(name, levels)] = t
    return out


def tensor_shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}
