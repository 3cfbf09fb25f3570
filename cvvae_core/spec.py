"""Model configuration: one dataclass, and the released configurations as named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VARIANTS = ("sd", "sd3")


@dataclass(frozen=True)
class ImageFamily:
    """An SD-family image VAE whose latent space a CV-VAE can share: latent channels and the
    (scale, shift) that diffusion models apply to its latents, ``(z - shift) * scale``."""

    name: str                          # the name configs and ``--family`` take
    short: str                         # the words users see: "SDXL", "FLUX.1", ...
    space: str                         # its latent space's name: "SD" for SD1.x/2.x (and SVD)
    latent_channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    variant: str | None = None         # the CV-VAE variant released in this latent space
    releases: tuple[str, ...] = ()     # ... and its release folder names
    assumed: bool = False              # the family assumed when only the channel count is known
    extra_users: str = ""              # other models known to share the latent space

    @property
    def description(self) -> str:
        return f"{self.short} image VAE"

    @property
    def scaling(self) -> tuple[float, float]:
        return self.scaling_factor, self.shift_factor

    @property
    def latent_space(self) -> str:
        users = ", ".join(filter(None, (self.description, self.extra_users)))
        released = f"; release{'s' if len(self.releases) > 1 else ''} {' / '.join(self.releases)}" \
            if self.releases else ""
        return f"{self.space} latent space ({users}{released})"


#: The families ``inflate`` and training know (values: the diffusers AutoencoderKL configs of
#: each model's ``vae/`` folder). Shapes tell 4 from 16 latent channels, never SD1.x from SDXL or
#: SD3 from FLUX.1: those pairs have the same architecture and differ only in their weights.
IMAGE_FAMILIES: dict[str, ImageFamily] = {f.name: f for f in (
    ImageFamily("sd1", "SD1.x/2.x", "SD", 4, 0.18215, variant="sd", releases=("vae3d", "vae3d_v1-1"), assumed=True,
                extra_users="SVD"),
    ImageFamily("sdxl", "SDXL", "SDXL", 4, 0.13025),
    ImageFamily("sd3", "SD3/SD3.5", "SD3", 16, 1.5305, 0.0609, variant="sd3", releases=("vae3d_sd3",), assumed=True),
    ImageFamily("flux", "FLUX.1", "FLUX.1", 16, 0.3611, 0.1159),
)}
#: The family assumed from the latent channel count alone, when nothing else says which one.
DEFAULT_FAMILY = {f.latent_channels: f.name for f in IMAGE_FAMILIES.values() if f.assumed}
#: The family whose latent space each CV-VAE variant shares (the official code stores SD's scale
#: only, 0.18215 in its config, and never SD3's).
VARIANT_FAMILY = {f.variant: f for f in IMAGE_FAMILIES.values() if f.variant}


def families_with_channels(latent_channels: int) -> list[ImageFamily]:
    """The families of this latent channel count: they have the same shapes, only weights differ."""
    return [f for f in IMAGE_FAMILIES.values() if f.latent_channels == latent_channels]


def same_shape_twins(name: str) -> list[ImageFamily]:
    """The other families a file of family ``name`` cannot be told apart from by its shapes."""
    channels = IMAGE_FAMILIES[name].latent_channels
    return [f for f in families_with_channels(channels) if f.name != name]


def channel_words(latent_channels: int) -> str | None:
    """The image models of a latent channel count, in words ("SD1.x/2.x/SDXL"), or None."""
    return "/".join(f.short for f in families_with_channels(latent_channels)) or None


def cvvae_owner(latent_channels: int) -> str:
    """Which CV-VAE release takes latents of this channel count, in words."""
    family = next((f for f in families_with_channels(latent_channels) if f.releases), None)
    if family is None:
        return "another model"
    return f"the {family.short}-compatible CV-VAE ({' / '.join(family.releases)})"


def family_scaling(name: str) -> tuple[float, float]:
    return IMAGE_FAMILIES[name].scaling


# The built-in image VAE's own (scale, shift) (cvvae_core/weights/builtin_image_vae.safetensors;
# a test checks that the file agrees); the built-in CV-VAE, trained against it, carries them too.
BUILTIN_IMAGE_LATENT_SCALING = (0.36133, 0.0)
# The image latent spaces a CV-VAE may share, told apart by the latent (scale, shift) in its
# metadata: a CV-VAE trained against, or inflated from, an image VAE keeps that VAE's values.
LATENT_SPACES = {
    **{f.scaling: f.latent_space for f in IMAGE_FAMILIES.values()},
    BUILTIN_IMAGE_LATENT_SCALING: "the built-in image VAE's latent space (builtin_image_vae.safetensors), not SD's",
}


def family_of(scaling_factor: float, shift_factor: float) -> str | None:
    """The name of the family with this latent (scale, shift), or None."""
    return next((f.name for f in IMAGE_FAMILIES.values() if f.scaling == (scaling_factor, shift_factor)), None)


class LevelledVAEConfig:
    """What the CV-VAE's and the image VAE's configurations share: levels of ``base_channels *
    channel_mult[i]`` channels, GroupNorm over ``norm_groups``, and the dict form files store."""

    def _check_levels(self):
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
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class CVVAEConfig(LevelledVAEConfig):
    """Architecture of a CV-VAE.

    ``variant`` selects the key layout and the numerical flavour of the official code:

    * ``"sd"`` (releases ``vae3d`` and ``vae3d_v1-1``, class ``CVVAEModel``): GroupNorm eps 1e-5,
      zero spatial padding, a temporal attention branch in the decoder mid-block.
    * ``"sd3"`` (release ``vae3d_sd3``, class ``CVVAESD3Model``): GroupNorm eps 1e-6, replicate
      padding in every 3-D convolution, no temporal attention.

    The latent scale/shift are those of the *image* VAE whose latent space CV-VAE shares. They are
    metadata only: ``encode``/``decode`` work in the raw (unscaled) latent space, as the official
    code does; diffusion pipelines apply ``(z - shift) * scale`` themselves.
    """

    variant: str = "sd"
    latent_channels: int = 4
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 2  # encoder; each decoder level has one more, as in the official code
    norm_groups: int = 32
    scaling_factor: float | None = None  # None: the image VAE's value for the variant
    shift_factor: float | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        scale, shift = VARIANT_FAMILY[self.variant].scaling
        if self.scaling_factor is None:
            object.__setattr__(self, "scaling_factor", scale)
        if self.shift_factor is None:
            object.__setattr__(self, "shift_factor", shift)
        self._check_levels()

    # Derived properties -------------------------------------------------------------------
    @property
    def norm_eps(self) -> float:
        return 1e-5 if self.variant == "sd" else 1e-6

    @property
    def spatial_padding(self) -> str:
        """Padding mode of the 3-D convolutions in H and W: ``constant`` (zeros) or ``replicate``."""
        return "constant" if self.variant == "sd" else "replicate"

    @property
    def temporal_attention(self) -> bool:
        return self.variant == "sd"

    def time_resampled(self, level: int) -> bool:
        """Levels 0, 2, ... (never the last) halve time in the encoder and double it in the decoder."""
        return level % 2 == 0 and level != self.num_levels - 1

    @property
    def latent_space(self) -> str:
        """Which image VAE's latent space this model shares, named from its latent scale/shift."""
        scaling = (self.scaling_factor, self.shift_factor)
        return LATENT_SPACES.get(scaling, f"the latent space of the image VAE it was trained with (scale "
                                          f"{scaling[0]}, shift {scaling[1]}): neither SD's nor SD3's")

    @property
    def time_compression(self) -> int:
        return 2 ** sum(self.time_resampled(i) for i in range(self.num_levels))

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.num_levels - 1)

    def latent_frames(self, frames: int) -> int:
        """Latent frames for ``frames`` input frames (exact for frames = 1 + 4k)."""
        return 1 + (frames - 1) // self.time_compression

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.time_compression


#: The released configurations (the official constructor defaults, see the official
#: ``models/modeling_vae.py``). ``vae3d_v1-1`` shares the architecture of ``vae3d``.
SD = CVVAEConfig(variant="sd", latent_channels=4)
SD3 = CVVAEConfig(variant="sd3", latent_channels=16)
PRESETS: dict[str, CVVAEConfig] = {"vae3d": SD, "vae3d_v1-1": SD, "vae3d_sd3": SD3}
