"""Image VAE files: SD-family ``AutoencoderKL`` weights in the LDM or the diffusers layout.

:func:`load_image_vae` reads files in the LDM/ComfyUI layout (with or without a ``first_stage_model.``
/ ``vae.`` prefix) and in the diffusers layout (``encoder.down_blocks.{i}.resnets.{j}``,
``mid_block.attentions.0.to_q``, ``conv_norm_out``), renamed on load by :mod:`cvvae_core.io.keymap`.

Family (which latent scale/shift a diffusion model applies): from an explicit ``family``, else
from the file (this project's metadata, or a diffusers ``config.json`` next to it), else from the
latent channels alone (4: SD1.x/2.x, 16: SD3). SD1.x and SDXL VAEs have the same shapes, and so
have SD3 and FLUX.1 VAEs: an SDXL or FLUX.1 VAE file without a config needs ``family``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import (CheckpointCorruptError, CheckpointKeyError, CheckpointNotFoundError, ForeignCheckpointError,
                      UnknownImageFamilyError)
from ..model.image_vae import ImageVAE, ImageVAEConfig
from ..spec import DEFAULT_FAMILY, IMAGE_FAMILIES, family_of
from . import keymap
from .architecture import architecture
from .builtin import builtin_image_vae_path, is_builtin
from .checkpoint import WEIGHTS_NAME
from .files import read_safetensors, write_safetensors

PREFIXES = ("first_stage_model.", "vae.", "")


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


def detect_image_config(sd: dict, hints: dict | None = None, family: str | None = None) -> ImageVAEConfig:
    """Architecture from tensor shapes (LDM layout); ``hints`` (the file's ``image_vae_config``
    metadata, or its diffusers ``config.json``) fill what shapes cannot tell (GroupNorm groups,
    scale/shift); ``family`` (a name of :data:`~cvvae_core.spec.IMAGE_FAMILIES`) sets the latent
    scale/shift and overrides the hints'. See the module docstring for how the family is chosen."""
    arch = architecture(keymap.tensor_shapes(sd))
    latent = arch["latent_channels"]
    d = dict(hints or {})
    d.update(arch, quant_conv="quant_conv.weight" in sd)
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


def _image_vae_file(path) -> Path:
    """The weights file of ``path``: the built-in image VAE for ``builtin``, the file itself, or the
    diffusers ``diffusion_pytorch_model.safetensors`` of a VAE folder (or of its ``vae/`` subfolder,
    for a whole pipeline folder)."""
    if is_builtin(path):
        return builtin_image_vae_path()
    path = Path(os.fspath(path))
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
    file = _image_vae_file(path)
    path = Path(os.fspath(path))
    sd, meta = read_safetensors(file)
    sd = strip_vae_prefix(sd)
    conv_in = sd.get("encoder.conv_in.weight")
    if conv_in is not None and conv_in.dim() == 5:
        what = "a CV-VAE release folder" if path.is_dir() else "a CV-VAE (a 3-D video VAE: its convolutions are 3-D)"
        raise ForeignCheckpointError(f"{path.name} is {what}, not an image VAE file. {_GIVE_AN_IMAGE_VAE}")
    if keymap.is_diffusers_layout(sd):
        sd = keymap.to_ldm(sd, video=False)
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
