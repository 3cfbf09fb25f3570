"""Loading and saving checkpoints in the official layouts.

Accepted: an official release folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
the parent folder holding ``vae3d/``, ``vae3d_v1-1/`` or ``vae3d_sd3/``, or one ``.safetensors``
file with the official key names, optionally under a common prefix (``first_stage_model.``,
``vae.``, ...). The variant and architecture come from key names and shapes, never from file
names. Pickle files (``.ckpt/.pt/.pth/.bin``) are refused unless ``allow_pickle=True``, and then
read with ``torch.load(weights_only=True)``.

Internally modules carry the SD variant's names; SD3 keys are translated on load and save
(:mod:`cvvae_core.io.keymap`); files are read by :mod:`cvvae_core.io.files`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..devices import default_dtype
from ..errors import CheckpointCorruptError, CheckpointKeyError, CheckpointNotFoundError, ForeignCheckpointError
from ..model.cvvae import CVVAE
from ..spec import PRESETS, CVVAEConfig, channel_words
from . import keymap
from .architecture import architecture
from .builtin import builtin_path, is_builtin
from .files import SAFETENSORS_SUFFIXES, read_weights, write_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
RELEASE_SUBFOLDERS = tuple(PRESETS)
ANCHOR = "encoder.conv_in.weight"
OFFICIAL_CLASS = {"sd": "CVVAEModel", "sd3": "CVVAESD3Model"}


def to_internal(sd: dict, cfg: CVVAEConfig) -> dict:
    """Official state dict of ``cfg.variant`` -> state dict of :class:`CVVAE` (same tensors)."""
    return dict(sd) if cfg.variant == "sd" else keymap.to_ldm(sd, video=True)


def to_official(sd: dict, cfg: CVVAEConfig) -> dict:
    """State dict of :class:`CVVAE` -> the official layout of ``cfg.variant``."""
    return dict(sd) if cfg.variant == "sd" else keymap.to_diffusers(sd, video=True)


def official_name(key: str, cfg: CVVAEConfig) -> str:
    return key if cfg.variant == "sd" else keymap.diffusers_name(key, cfg.num_levels)


# Recognising what a state dict holds ------------------------------------------------------
def strip_prefix(keys) -> str:
    """The prefix in front of ``encoder.conv_in.weight`` (``''`` if none; ``None`` if absent)."""
    hits = sorted((k[: -len(ANCHOR)] for k in keys if k.endswith(ANCHOR)), key=len)
    return hits[0] if hits else None


def describe_foreign(keys) -> str:
    """A short human description of a state dict that is not a CV-VAE."""
    keys = list(keys)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a diffusion model checkpoint (UNet weights), not a VAE"
    if any("decoder.mid.block_1.mix_factor" in k for k in keys):
        return "the SVD image VAE with a temporal decoder, not CV-VAE"
    if any(k.startswith(("taesd_", "encoder.layers", "decoder.layers")) or k.startswith("decoder.22.") for k in keys):
        return "a tiny autoencoder (TAESD/TAEHV), not CV-VAE"
    if any("middle.0.residual" in k for k in keys):
        return "a Wan video VAE, not CV-VAE"
    if any(k.startswith(("text_model.", "transformer.", "conditioner.")) for k in keys):
        return "a text/vision encoder or transformer checkpoint, not a VAE"
    sample = ", ".join(sorted(keys)[:4])
    return f"not a CV-VAE checkpoint (no encoder.conv_in.weight; keys look like: {sample})"


def detect_config(shapes: dict[str, tuple], hints: dict | None = None) -> CVVAEConfig:
    """Infer the architecture from official key names and shapes (prefix already removed).

    ``hints`` may carry what shapes cannot tell (``norm_groups``, scaling factors), from a
    ``config.json`` or the file's metadata. Without them, the released models' 32 groups are
    assumed, or, where 32 does not divide the channels, the configuration of the shipped model of
    the same shapes (the built-in one, re-saved without its metadata)."""
    hints = hints or {}
    conv_in = shapes.get(ANCHOR)
    if conv_in is None:
        raise ForeignCheckpointError(f"This file is {describe_foreign(shapes)}.")
    if len(conv_in) == 4:
        z = shapes.get("decoder.conv_in.weight", (0, 0))[1]
        family = channel_words(z) or "2-D"
        raise ForeignCheckpointError(
            f"This is a {family} image VAE (2-D convolutions, {z} latent channels), not CV-VAE. Load it with "
            "ComfyUI's 'Load VAE', or build a CV-VAE from it with `python -m cvvae_core inflate IMAGE_VAE OUT`.")
    variant = "sd3" if keymap.is_diffusers_layout(shapes) else "sd"
    if variant == "sd" and "encoder.down.0.block.0.conv1.weight" not in shapes:
        raise ForeignCheckpointError(
            "This is a 3-D video VAE of another family (its encoder has no down.*.block.* or "
            "down_blocks.*.resnets.* layers), not CV-VAE.")
    levels = keymap.levels_of(shapes)
    shapes = {keymap.ldm_name(k, levels): v for k, v in shapes.items()} if variant == "sd3" else shapes
    if len(shapes.get("encoder.down.0.block.0.conv1.weight", ())) != 5:
        raise ForeignCheckpointError("Its ResNet convolutions are 2-D: an image VAE, not CV-VAE.")
    arch = architecture(shapes)
    if "norm_groups" not in hints and any(arch["base_channels"] * m % 32 for m in arch["channel_mult"]):
        hints = {**_shipped_config(variant, arch), **hints}
    try:
        return CVVAEConfig(variant=variant, norm_groups=int(hints.get("norm_groups", 32)),
                           scaling_factor=hints.get("scaling_factor"), shift_factor=hints.get("shift_factor"), **arch)
    except ValueError as e:
        raise CheckpointKeyError(f"Inconsistent CV-VAE shapes: {e}") from None


def _shipped_config(variant: str, arch: dict) -> dict:
    """The configuration (group count, latent scale/shift) of the shipped model with these shapes."""
    with safe_open(str(builtin_path()), framework="pt") as f:
        builtin = json.loads(f.metadata()["cvvae_config"])
    if variant == builtin["variant"] and all(CVVAEConfig.from_dict(builtin).to_dict()[k] == v
                                             for k, v in arch.items()):
        return {k: builtin[k] for k in ("norm_groups", "scaling_factor", "shift_factor")}
    channels = ", ".join(str(arch["base_channels"] * m) for m in arch["channel_mult"])
    raise CheckpointKeyError(
        f"This is a CV-VAE ({variant} layout, level channels {channels}) saved without its configuration: "
        "the GroupNorm group count cannot be read from weights, and the released models' 32 does not divide "
        "its channels. Save it with cvvae_core.save_model (a .safetensors file or a release folder keeps the "
        "configuration), or put its config.json (with norm_num_groups) next to the weights file.")


def _hints_from_config_json(cfg: dict) -> dict:
    hints = {}
    if "norm_num_groups" in cfg:
        hints["norm_groups"] = cfg["norm_num_groups"]
    for name in ("scaling_factor", "shift_factor"):
        if cfg.get(name) is not None:
            hints[name] = cfg[name]
    return hints


# Reading files -----------------------------------------------------------------------------
def resolve_path(path, subfolder: str | None = None) -> tuple[Path, dict]:
    """The weights file for ``path`` and the parsed ``config.json`` next to it (or ``{}``).

    ``"builtin"`` names the small model that ships inside the package (a folder of that name in
    the working directory is reached as ``"./builtin"``)."""
    if is_builtin(path):
        return builtin_path(), {}
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"No such file or folder: {path}")
    if path.is_dir():
        if subfolder:
            path = path / subfolder
        weights = [path / WEIGHTS_NAME, path / "diffusion_pytorch_model.bin"]
        found = next((w for w in weights if w.exists()), None)
        if found is None:
            subs = sorted(d.name for d in path.iterdir() if d.is_dir() and any((d / w.name).exists() for w in weights))
            if len(subs) == 1:
                return resolve_path(path / subs[0])
            if subs:
                raise CheckpointNotFoundError(
                    f"{path} holds several models ({', '.join(subs)}); pass one of these folders, e.g. "
                    f"{path / subs[0]} (or subfolder='{subs[0]}').")
            raise CheckpointNotFoundError(
                f"{path} holds no {WEIGHTS_NAME} and none of the release folders {RELEASE_SUBFOLDERS}.")
        config_file = path / "config.json"
        config = {}
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except (ValueError, OSError) as e:
                raise CheckpointCorruptError(f"{config_file} is not valid JSON: {e}") from None
        return found, config
    return path, {}


def read_state_dict(path, allow_pickle: bool = False, subfolder: str | None = None) -> tuple[dict, dict]:
    """(state dict with the official keys, hints) from any accepted path; the prefix is removed."""
    file, config_json = resolve_path(path, subfolder)
    sd, metadata = read_weights(file, allow_pickle)
    prefix = strip_prefix(sd)
    if prefix is None:
        raise ForeignCheckpointError(f"{file.name} is {describe_foreign(sd)}.")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    hints = _hints_from_config_json(config_json)
    if "cvvae_config" in metadata:
        try:
            hints.update(json.loads(metadata["cvvae_config"]))
        except ValueError:
            pass
    return sd, hints


def _check_keys(model_sd: dict, sd: dict, cfg: CVVAEConfig, source: str):
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    shaped = sorted(k for k in set(sd) & set(model_sd) if tuple(sd[k].shape) != tuple(model_sd[k].shape))
    if not (missing or unexpected or shaped):
        return
    official = lambda keys: [official_name(k, cfg) for k in keys]
    lines = [f"{source} does not match the CV-VAE {cfg.variant} layout it resembles:"]
    if missing:
        lines.append(f"  {len(missing)} missing, e.g. {', '.join(official(missing[:5]))}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected, e.g. {', '.join(official(unexpected[:5]))}")
    if shaped:
        lines.append("  {} with the wrong shape, e.g. {}".format(len(shaped), ", ".join(
            f"{k}: file {list(sd[k].shape)} vs model {list(model_sd[k].shape)}" for k in shaped[:3])))
    if any("quant_conv" in k for k in unexpected):
        lines.append("  It has quant_conv/post_quant_conv layers, as a 2-D SD image VAE does: it is not a CV-VAE "
                     "(CV-VAE releases have none).")
    lines.append("  Use an unmodified vae3d / vae3d_v1-1 / vae3d_sd3 release file.")
    raise CheckpointKeyError("\n".join(lines))


def build_model(sd: dict, hints: dict | None = None, source: str = "checkpoint",
                device=None, dtype=None) -> CVVAE:
    """A :class:`CVVAE` holding the official-layout state dict ``sd``."""
    cfg = detect_config(keymap.tensor_shapes(sd), hints)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = CVVAE(cfg).to(dtype)
    internal = to_internal(sd, cfg)
    _check_keys(model.state_dict(), internal, cfg, source)
    # The reader's tensors are views of the memory-mapped file: unaligned (kernels may round
    # differently on them) and changed by anyone who rewrites the file in place. Copy each one
    # once, cast on the way, into fresh memory of the final dtype on the final device.
    model.to_empty(device=device).load_state_dict(internal, strict=True)
    return model.eval().requires_grad_(False)


def load_model(path, device=None, dtype=None, *, allow_pickle: bool = False, subfolder: str | None = None) -> CVVAE:
    """Load a CV-VAE from a release folder, its parent, or a single weights file.

    ``dtype`` defaults to fp32 on CPU and bf16 (fp16 where bf16 is unsupported) on CUDA.
    """
    sd, hints = read_state_dict(path, allow_pickle=allow_pickle, subfolder=subfolder)
    return build_model(sd, hints, source=Path(os.fspath(path)).name, device=device, dtype=dtype)


def official_config_json(cfg: CVVAEConfig) -> dict:
    """A ``config.json`` in the official diffusers style for ``cfg``."""
    common = {"_class_name": OFFICIAL_CLASS[cfg.variant], "in_channels": cfg.in_channels, "double_z": True,
              "causal_encoder": True, "causal_decoder": False, "half_3d": True, "en_de_n_frames_a_time": 16,
              "time_n_compress": cfg.time_compression, "spatial_n_compress": cfg.spatial_compression,
              "tile_spatial_size": 576, "tile_overlap_ratio": 0.2222}
    if cfg.variant == "sd":
        arch = {"ch": cfg.base_channels, "ch_mult": list(cfg.channel_mult), "num_res_blocks": cfg.blocks_per_level,
                "z_channels": cfg.latent_channels, "out_ch": cfg.in_channels, "attn_resolutions": [],
                "use_3d_conv": True, "encoder_attn_type": "vanilla-xformers",
                "decoder_attn_type": "spatial-temporal-xformer", "scaling_factor": cfg.scaling_factor}
        if cfg.shift_factor:  # a FLUX.1 or SD3 latent space: not in the official config, read back by the loader
            arch["shift_factor"] = cfg.shift_factor
    else:
        arch = {"out_channels": cfg.latent_channels, "block_out_channels": list(cfg.level_channels),
                "down_block_types": ["DownEncoderBlock3D"] * cfg.num_levels,
                "up_block_types": ["UpDecoderBlock3D"] * cfg.num_levels, "layers_per_block": cfg.blocks_per_level,
                "act_fn": "silu", "mid_block_add_attention": True}
    arch["norm_num_groups"] = cfg.norm_groups
    return {**common, **arch}


def save_model(model: CVVAE, path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` in the official layout: a ``.safetensors`` path gives one file; any other
    path gives a release folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    cfg = model.config
    sd = to_official(model.state_dict(), cfg)
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()}
    metadata = {"format": "pt", "cvvae_variant": cfg.variant, "cvvae_config": json.dumps(cfg.to_dict())}
    path = Path(os.fspath(path))
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(sd, path, metadata)
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(official_config_json(cfg), indent=2))
    write_safetensors(sd, path / WEIGHTS_NAME, metadata)
    return path
