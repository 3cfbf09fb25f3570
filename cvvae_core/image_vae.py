"""An SD-family image VAE (``AutoencoderKL``): SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, or the built-in one.

This is the 2-D model whose latent space a CV-VAE shares: its frozen decoder is the target of
the latent regularization (:mod:`cvvae_core.training`) and its weights initialise the video VAE
(:mod:`cvvae_core.inflate`). Module names are the LDM/ComfyUI ones (``encoder.down.{i}.block.{j}``,
``decoder.up.{i}...``, ``quant_conv``). :func:`load_image_vae` reads files in that layout (with or
without a ``first_stage_model.`` / ``vae.`` prefix) and in the diffusers layout
(``encoder.down_blocks.{i}.resnets.{j}``, ``mid_block.attentions.0.to_q``, ``conv_norm_out``),
converting the latter on load. SD3/FLUX VAEs, and the small built-in one, have no
``quant_conv``/``post_quant_conv``.

Family (which latent scale/shift a diffusion model applies): from an explicit ``family``, else
from the file (this project's metadata, or a diffusers ``config.json`` next to it), else from the
latent channels alone (4: SD1.x/2.x, 16: SD3). SD1.x and SDXL VAEs have the same shapes, and so
have SD3 and FLUX.1 VAEs: an SDXL or FLUX.1 VAE file without a config needs ``family``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import WEIGHTS_NAME, read_safetensors, write_safetensors
from .config import DEFAULT_FAMILY, IMAGE_FAMILIES, family_of
from .errors import (CheckpointCorruptError, CheckpointKeyError, CheckpointNotFoundError, ForeignCheckpointError,
                     UnknownImageFamilyError)

PREFIXES = ("first_stage_model.", "vae.", "")


@dataclass(frozen=True)
class ImageVAEConfig:
    latent_channels: int = 4
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 2          # encoder; the decoder has one more per level, as in LDM
    norm_groups: int = 32
    norm_eps: float = 1e-6             # LDM's Normalize
    quant_conv: bool = True            # SD1.x/SDXL have quant_conv/post_quant_conv; SD3/Flux do not
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        for ch in self.level_channels:
            if ch % self.norm_groups:
                raise ValueError(f"channels {ch} not divisible by norm_groups {self.norm_groups}")

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: ImageVAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock2D(nn.Module):
    """Single-head self-attention over H*W (head dim = C), 1x1-conv projections, residual."""

    def __init__(self, channels: int, cfg: ImageVAEConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample2D(nn.Module):
    """SD's downsample: zero-pad right/bottom by one, stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock2D(nn.Module):
    def __init__(self, channels: int, cfg: ImageVAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock2D(channels, channels, cfg)
        self.attn_1 = AttnBlock2D(channels, cfg)
        self.block_2 = ResnetBlock2D(channels, channels, cfg)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder2D(nn.Module):
    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = chans[0]
        for level, ch in enumerate(chans):
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock2D(cin if j == 0 else ch, ch, cfg)
                                        for j in range(cfg.blocks_per_level))
            if level != cfg.num_levels - 1:
                stage.downsample = Downsample2D(ch)
            self.down.append(stage)
            cin = ch
        self.mid = MidBlock2D(cin, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder2D(nn.Module):
    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1)
        self.mid = MidBlock2D(cin, cfg)
        stages = []
        for level in reversed(range(cfg.num_levels)):
            ch = chans[level]
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock2D(cin if j == 0 else ch, ch, cfg)
                                        for j in range(cfg.blocks_per_level + 1))
            if level != 0:
                stage.upsample = Upsample2D(ch)
            stages.insert(0, stage)
            cin = ch
        self.up = nn.ModuleList(stages)  # indexed by level, run from the top, as in LDM
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ImageVAE(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] <-> raw latents ``[B, C, H/8, W/8]`` (unscaled, as CV-VAE's).

    ``decode_video``/``encode_video`` apply the model frame by frame to ``[B, C, T, H, W]``
    tensors: that is how the latent regularization and the compatibility measure use it.
    """

    def __init__(self, config: ImageVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder2D(config)
        self.decoder = Decoder2D(config)
        if config.quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.config.num_levels - 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.config.quant_conv else h

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.moments(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.config.quant_conv else z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean."""
        return self.encode_distribution(x)[0]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction, mean, logvar) with a sampled latent."""
        mean, logvar = self.encode_distribution(x)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.decode(mean + torch.exp(0.5 * logvar) * noise), mean, logvar

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = video.shape
        z = self.encode(video.transpose(1, 2).flatten(0, 1))
        return z.unflatten(0, (b, t)).transpose(1, 2)

    def decode_video(self, latent: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = latent.shape
        x = self.decode(latent.transpose(1, 2).flatten(0, 1))
        return x.unflatten(0, (b, t)).transpose(1, 2)


# Checkpoints -------------------------------------------------------------------------------

def strip_vae_prefix(sd: dict) -> dict:
    """The VAE keys of ``sd`` without their prefix (a full SD checkpoint keeps its VAE under
    ``first_stage_model.``; ComfyUI/diffusers-era single files use ``vae.`` or none)."""
    for prefix in PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in sd and f"{prefix}decoder.conv_out.weight" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    raise ForeignCheckpointError(
        "no image VAE found (expected encoder.conv_in.weight and decoder.conv_out.weight, optionally under "
        "first_stage_model. or vae.; keys look like: " + ", ".join(sorted(sd)[:4]) + "); pass an SD-family VAE "
        ".safetensors file (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1) in the LDM or diffusers layout")


# diffusers AutoencoderKL name -> LDM name; {up} is the LDM level of a decoder up block (diffusers
# counts up blocks from the top). Attention: new (to_q ...) and old (query ...) diffusers names.
_DIFFUSERS_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{up}.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{up}.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.(group_norm)\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.(to_q|query)\.", ".mid.attn_1.q."),
    (r"\.mid_block\.attentions\.0\.(to_k|key)\.", ".mid.attn_1.k."),
    (r"\.mid_block\.attentions\.0\.(to_v|value)\.", ".mid.attn_1.v."),
    (r"\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def is_diffusers_layout(sd: dict) -> bool:
    return "encoder.down_blocks.0.resnets.0.conv1.weight" in sd


def from_diffusers_layout(sd: dict) -> dict:
    """A diffusers ``AutoencoderKL`` state dict renamed to the LDM layout; the attention
    projections (``nn.Linear`` there, 1x1 convolutions here) get their two unit dimensions."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in sd.items():
        name = key
        for pattern, repl in _DIFFUSERS_RULES:
            m = re.search(pattern, name)
            if m:
                up = levels - 1 - int(m.group(1)) if "{up}" in repl else None
                name = re.sub(pattern, repl.replace("{up}", str(up)), name)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[name] = value
    return out


def detect_image_config(sd: dict, hints: dict | None = None, family: str | None = None) -> ImageVAEConfig:
    """Architecture from tensor shapes (LDM layout); ``hints`` (the file's ``image_vae_config``
    metadata, or its diffusers ``config.json``) fill what shapes cannot tell (GroupNorm groups,
    scale/shift); ``family`` (a name of :data:`~cvvae_core.config.IMAGE_FAMILIES`) sets the latent
    scale/shift and overrides the hints'. See the module docstring for how the family is chosen."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    base = sd["encoder.conv_in.weight"].shape[0]
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in range(levels))
    latent = sd["decoder.conv_in.weight"].shape[1]
    d = dict(hints or {})
    d.update(latent_channels=latent, in_channels=sd["encoder.conv_in.weight"].shape[1],
             base_channels=base, channel_mult=mult, blocks_per_level=blocks, quant_conv="quant_conv.weight" in sd)
    if family is None and "scaling_factor" not in d:
        family = DEFAULT_FAMILY.get(latent)
        if family is None:
            raise UnknownImageFamilyError(
                f"this image VAE has {latent} latent channels and no latent scale/shift in its metadata: it is "
                f"none of the families CV-VAE can share a latent space with ({_family_list()}). For an SD-family "
                "VAE of your own, save it with save_image_vae (its metadata then carries scale/shift) or put its "
                "diffusers config.json (scaling_factor, shift_factor) next to it")
    if family is not None:
        known = IMAGE_FAMILIES.get(family)
        if known is None:
            raise UnknownImageFamilyError(f"unknown image VAE family {family!r}; known: {_family_list()}")
        if known.latent_channels != latent:
            raise UnknownImageFamilyError(
                f"family {family!r} ({known.description}) has {known.latent_channels} latent channels, this image "
                f"VAE has {latent}; pick one of: {_family_list(latent)}")
        d.update(scaling_factor=known.scaling_factor, shift_factor=known.shift_factor)
    try:
        return ImageVAEConfig.from_dict(d)
    except ValueError as e:
        raise CheckpointKeyError(f"cannot size the image VAE from its tensors ({e}); a VAE that is not SD's "
                                 "32-group GroupNorm needs its 'image_vae_config' metadata (save_image_vae writes it)")


def _family_list(latent_channels: int | None = None) -> str:
    return ", ".join(f"{f.name} ({f.description}, {f.latent_channels} channels)" for f in IMAGE_FAMILIES.values()
                     if latent_channels in (None, f.latent_channels)) or "none"


def _hints_from_diffusers_config(config_file: Path) -> dict:
    try:
        cfg = json.loads(config_file.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointCorruptError(f"{config_file} is not valid JSON: {e}") from None
    hints = {"norm_groups": cfg["norm_num_groups"]} if "norm_num_groups" in cfg else {}
    if cfg.get("scaling_factor") is not None:
        hints.update(scaling_factor=cfg["scaling_factor"], shift_factor=cfg.get("shift_factor") or 0.0)
    return hints


_GIVE_AN_IMAGE_VAE = ("Give an SD-family image VAE .safetensors (e.g. an SD1.x/2.x VAE) or a diffusers VAE folder, "
                      "or 'builtin' for the built-in image VAE; a CV-VAE file goes where a CV-VAE is asked for (info, "
                      "reconstruct, the first argument of compat).")


def _image_vae_file(path: Path) -> Path:
    """The weights file of ``path``: itself, or the diffusers ``diffusion_pytorch_model.safetensors``
    of a VAE folder (or of its ``vae/`` subfolder, for a whole pipeline folder)."""
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointNotFoundError(f"image VAE file {path} does not exist; pass the path of a .safetensors file")
    for folder in (path, path / "vae"):
        if (folder / WEIGHTS_NAME).is_file():
            return folder / WEIGHTS_NAME
    raise CheckpointNotFoundError(f"{path} is a folder without {WEIGHTS_NAME}, not an image VAE. {_GIVE_AN_IMAGE_VAE}")


def load_image_vae(path, device=None, dtype=torch.float32, family: str | None = None) -> ImageVAE:
    """Load an SD-family image VAE (frozen, eval mode) from a ``.safetensors`` file in the LDM or
    diffusers layout, or a diffusers VAE folder. ``family`` (``sd1``, ``sdxl``, ``sd3``, ``flux``)
    names its latent scale/shift where the file cannot (see the module docstring). A CV-VAE file or
    release folder given instead is refused with a typed error saying what to give."""
    path = Path(os.fspath(path))
    file = _image_vae_file(path)
    sd, meta = read_safetensors(file)
    sd = strip_vae_prefix(sd)
    conv_in = sd.get("encoder.conv_in.weight")
    if conv_in is not None and conv_in.dim() == 5:
        what = "a CV-VAE release folder" if path.is_dir() else "a CV-VAE (a 3-D video VAE: its convolutions are 3-D)"
        raise ForeignCheckpointError(f"{path.name} is {what}, not an image VAE file. {_GIVE_AN_IMAGE_VAE}")
    if is_diffusers_layout(sd):
        sd = from_diffusers_layout(sd)
    hints = None
    if "image_vae_config" in meta:
        hints = json.loads(meta["image_vae_config"])
    elif (file.parent / "config.json").is_file() and file.name == WEIGHTS_NAME:
        hints = _hints_from_diffusers_config(file.parent / "config.json")
    cfg = detect_image_config(sd, hints, family)
    model = ImageVAE(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Full SD checkpoints may carry loss/discriminator tensors next to the VAE; ignore those.
    unexpected = [k for k in unexpected if not k.startswith(("loss.", "model_ema."))]
    if missing or unexpected:
        raise CheckpointKeyError(f"{path.name}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}; "
                                 "is this an SD-family (AutoencoderKL) VAE in the LDM or diffusers layout?")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def image_family(cfg: ImageVAEConfig) -> str:
    """What the latent (scale, shift) of ``cfg`` says about its family, in words."""
    name = family_of(cfg.scaling_factor, cfg.shift_factor)
    if name is None:
        return f"own latent space (scale {cfg.scaling_factor}, shift {cfg.shift_factor})"
    return f"{name}: {IMAGE_FAMILIES[name].description} (scale {cfg.scaling_factor}, shift {cfg.shift_factor})"


def save_image_vae(model: ImageVAE, path, dtype: torch.dtype | None = None) -> Path:
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    write_safetensors(sd, path, {"format": "pt", "image_vae_config": json.dumps(model.config.to_dict())})
    return path
