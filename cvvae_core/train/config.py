"""Training configuration: :class:`TrainConfig` and :class:`LossConfig`, read from JSON and checked
whole (every key at every level: known, of its type, in its range) before anything is written or
built. A config that cannot run raises :class:`~cvvae_core.errors.TrainConfigError` in one line."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..data.clips import DataConfig
from ..errors import TrainConfigError
from ..data.manifest import VIDEO_SUFFIXES
from ..io.builtin import CONFIGS_DIR, is_builtin
from ..spec import IMAGE_FAMILIES

MODELS = ("image_vae", "cvvae")
#: Free text any level of a config may carry.
COMMENT = "comment"


# Checking values against the dataclass fields --------------------------------------------------
def _words(hint) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is dict:
        return "an object"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _words(a) for a in args)
    if origin is tuple:
        return f"a list of {_words(args[0])}s" if args[-1] is Ellipsis else f"a list of {len(args)} numbers"
    if dataclasses.is_dataclass(hint):
        return "an object"
    return str(hint)


def _value(value, hint, where: str):
    """``value`` as the field type ``hint`` asks (a JSON list becomes a tuple, an int a float, an
    object the nested dataclass), or TrainConfigError saying what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _value(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return build(hint, value, f"{where}.")
    elif origin is tuple and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) == len(value):
            return tuple(_value(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str, dict) and isinstance(value, hint):
        return value
    quoted = " (in quotes: write numbers and true/false without them)" if isinstance(value, str) else ""
    raise TrainConfigError(f"{where}: expected {_words(hint)}, got {json.dumps(value)}{quoted}")


def check_fields(obj, where: str = ""):
    """Every field of the dataclass ``obj`` converted to its type and checked against the class's
    ``RANGES`` (name -> (words, test)); nested objects become their dataclasses."""
    hints = typing.get_type_hints(type(obj))
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        name = f"{where}{f.name}"
        value = _value(getattr(obj, f.name), hints[f.name], name)
        if f.name in ranges and value is not None and not ranges[f.name][1](value):
            raise TrainConfigError(f"{name}: must be {ranges[f.name][0]}, got {json.dumps(value)}")
        object.__setattr__(obj, f.name, value)


def build(cls, values: dict, where: str = ""):
    """``cls(**values)`` for a dataclass ``cls``; an unknown key is an error that lists the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - {COMMENT})
    if unknown:
        raise TrainConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(f'{where}{k}' for k in unknown)}; valid keys"
                               f"{' in ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _value(v, hints[k], f"{where}{k}") for k, v in values.items() if k in names})


def _at_least(n):
    return f">= {n}", lambda v: v >= n


_POSITIVE = ("> 0", lambda v: v > 0)
_NOT_NEGATIVE = _at_least(0)


# The configuration ----------------------------------------------------------------------------
@dataclass
class LossConfig:
    rec_loss: str = "l1"               # "l1" or "l2", for both reconstructions (official: l1)
    perceptual: str = "ssim"           # "ssim", "lpips" or "none" (see cvvae_core.train.losses)
    lpips_vgg: str | None = None       # perceptual "lpips": torchvision VGG16 weights (.safetensors/.pth)
    lpips_lin: str | None = None       # ... and the lpips package's linear layers (lin0..lin4)
    perceptual_weight: float = 0.5     # official: 0.5
    kl_weight: float = 1.0             # official CV-VAE: 1.0; LDM image VAE: 1e-6
    rec2d_weight: float = 1.0          # latent regularization weight (official: 1.0); 0 = off
    target_type: str = "random"        # frame of each group the image decoder must reproduce
    learn_logvar: bool = True          # official CV-VAE: True; LDM image VAE: False
    adversarial_weight: float = 0.0    # hinge GAN on a 3-D/2-D patch discriminator; 0 = off
    disc_start: int = 0

    RANGES: typing.ClassVar = {
        "rec_loss": ("'l1' or 'l2'", lambda v: v in ("l1", "l2")),
        "perceptual": ("'ssim', 'lpips' or 'none'", lambda v: v in ("ssim", "lpips", "none")),
        "target_type": ("'random' or 'slice'", lambda v: v in ("random", "slice")),
        "perceptual_weight": _NOT_NEGATIVE, "kl_weight": _NOT_NEGATIVE, "rec2d_weight": _NOT_NEGATIVE,
        "adversarial_weight": _NOT_NEGATIVE, "disc_start": _NOT_NEGATIVE,
    }

    def __post_init__(self):
        check_fields(self, "loss.")
        if self.perceptual == "lpips" and not (self.lpips_vgg and self.lpips_lin):
            raise TrainConfigError("loss.perceptual 'lpips' needs loss.lpips_vgg (torchvision VGG16 weights) and "
                                   "loss.lpips_lin (the lpips package's vgg linear layers); nothing is downloaded")


@dataclass
class TrainConfig:
    """One training run. :meth:`from_json` reads it from a file; the values are checked either way.

    Paths in a config file (``image_vae``, a checkpoint ``init``, ``loss.lpips_*``, ``data.videos``,
    ``data.val``) are ``builtin`` (where a model is asked for: the shipped model) or relative to
    the config file, so a config works from any directory, the shipped ones from an installed
    package too. ``out_dir`` is where the run writes: relative to the working directory. Values
    set from Python or the command line are taken as given (relative to the working directory)."""

    model: str = "cvvae"
    out_dir: str = "out/train"
    steps: int = 1000
    batch_size: int = 1                # clips per step
    frames: int = 9                    # frames per clip (1+4k); image VAE: frames per clip used as images
    height: int = 64
    width: int = 64
    seed: int = 0
    lr: float = 2e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.98)   # official optimizer settings
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    grad_clip: float = 0.0             # max gradient norm; 0 = off (the official run does not clip)
    image_vae: str | None = None       # cvvae: the frozen image VAE (.safetensors, LDM or diffusers layout, or builtin)
    image_vae_family: str | None = None   # its family (sd1, sdxl, sd3, flux) where the file cannot tell
    init: str = "inflate"              # cvvae: "inflate" (from image_vae), "scratch", or a CV-VAE checkpoint
    image_vae_config: dict = field(default_factory=dict)   # image_vae: ImageVAEConfig fields
    loss: LossConfig = field(default_factory=LossConfig)
    log_every: int = 10
    save_every: int = 100
    snapshot_steps: tuple[int, ...] = ()   # also keep OUT/checkpoint-STEP at these steps (for comparisons)
    threads: int | None = None         # torch CPU threads; None = leave as is
    max_minutes: float | None = None   # stop (and save) after this much wall time
    data: DataConfig = field(default_factory=DataConfig)   # see cvvae_core.data.clips; default: procedural
    grad_accum: int = 1                # micro-batches per optimiser step (global batch: batch x ranks x this)
    activation_checkpointing: bool = False   # recompute block activations in backward: less memory, ~1/3 slower
    precision: str = "bf16"            # CUDA: "bf16" autocast or "fp32"; the CPU always trains in float32
    ema_decay: float = 0.0             # EMA of the weights (e.g. 0.999), exported next to the checkpoint; 0 = off
    val_every: int = 0                 # validate on the held-out clips every N steps (and at the end); 0 = off
    tensorboard: bool = True           # also write OUT/tensorboard when tensorboard is installed

    RANGES: typing.ClassVar = {
        "model": (" or ".join(repr(m) for m in MODELS), lambda v: v in MODELS),
        "steps": _at_least(1), "batch_size": _at_least(1), "frames": _at_least(1), "height": _at_least(8),
        "width": _at_least(8), "seed": _NOT_NEGATIVE, "lr": _POSITIVE, "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
        "warmup_steps": _NOT_NEGATIVE, "betas": ("two numbers in [0, 1)", lambda v: all(0 <= b < 1 for b in v)),
        "weight_decay": _NOT_NEGATIVE, "adam_eps": _POSITIVE, "grad_clip": _NOT_NEGATIVE,
        "image_vae_family": (" or ".join(repr(f) for f in IMAGE_FAMILIES), lambda v: v in IMAGE_FAMILIES),
        "log_every": _at_least(1), "save_every": _at_least(1),
        "snapshot_steps": ("steps >= 1", lambda v: all(s >= 1 for s in v)),
        "threads": _at_least(1), "max_minutes": _POSITIVE, "grad_accum": _at_least(1),
        "precision": ("'bf16' (autocast on CUDA) or 'fp32'", lambda v: v in ("bf16", "fp32")),
        "ema_decay": ("in [0, 1), e.g. 0.999", lambda v: 0 <= v < 1), "val_every": _NOT_NEGATIVE,
    }

    def __post_init__(self):
        check_fields(self)
        if self.model == "cvvae" and (self.frames - 1) % 4:
            raise TrainConfigError(f"frames must be 1+4k for a CV-VAE, got {self.frames}; use 9 or 17")
        if self.model == "cvvae" and self.image_vae is None and (self.init == "inflate" or self.loss.rec2d_weight):
            raise TrainConfigError("a CV-VAE run needs 'image_vae' (the frozen decoder and/or the inflation source; "
                                   "'builtin' for the shipped one)")
        if self.height % 8 or self.width % 8:
            raise TrainConfigError(f"height and width must be multiples of 8, got {self.height}x{self.width}")
        self.data.check_crop(self.height, self.width)
        if self.val_every and not (self.data.synthetic or self.data.val or self.data.val_split):
            raise TrainConfigError("val_every needs held-out clips: set data.val (a folder or manifest) or "
                                   "data.val_split (e.g. 0.05), or set val_every to 0")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, path, overrides: dict | None = None) -> "TrainConfig":
        """The config in file ``path`` (paths in it resolved as the class docstring says), with
        ``overrides`` (keys of this class; None values ignored) applied before it is checked."""
        path = config_path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            what = "a video" if path.suffix.lower() in VIDEO_SUFFIXES else "not a text file"
            raise TrainConfigError(f"{path} is {what}, not a training config (a .json file, or a shipped config: "
                                   f"{', '.join(shipped_configs())})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise TrainConfigError(f"cannot read training config {path}: {e}") from None
        if not isinstance(values, dict):
            raise TrainConfigError(f"training config {path}: expected a JSON object of settings")
        values = resolve_paths(values, path.resolve().parent)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return build(cls, values)
        except TrainConfigError as e:
            raise TrainConfigError(f"{path}: {e}") from None


def shipped_configs() -> list[str]:
    """The names of the training configs that ship with the package (``builtin_cvvae``, ...)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def config_path(name) -> Path:
    """The config file ``name`` stands for: an existing file, else a shipped config by its name with
    or without ``.json`` (``builtin_cvvae``), also as a path that is not there (the clone's
    ``cvvae_core/train_configs/builtin_cvvae.json`` run from another folder)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = path.name[:-len(".json")] if path.name.endswith(".json") else path.name
    if not path.exists() and stem in shipped_configs():
        return CONFIGS_DIR / f"{stem}.json"
    found = "is a folder" if path.is_dir() else "does not exist"
    raise TrainConfigError(f"{name} {found}; give a training config .json file, or a shipped config: "
                           f"{', '.join(shipped_configs())}")


def _relative_to(value, folder: Path, model: bool = False):
    if not isinstance(value, str) or (model and is_builtin(value)) or Path(value).expanduser().is_absolute():
        return value
    return str(folder / value)


def resolve_paths(values: dict, folder: Path) -> dict:
    """``values`` of a config file with its input paths made relative to ``folder`` (see TrainConfig)."""
    values = dict(values)
    if "image_vae" in values:
        values["image_vae"] = _relative_to(values["image_vae"], folder, model=True)
    if values.get("init") not in (None, "inflate", "scratch"):
        values["init"] = _relative_to(values["init"], folder, model=True)
    for key, names in (("loss", ("lpips_vgg", "lpips_lin")), ("data", ("videos", "val"))):
        if isinstance(values.get(key), dict):
            values[key] = {k: _relative_to(v, folder) if k in names else v for k, v in values[key].items()}
    return values
