"""Tuning Stable Video Diffusion's output layer (``out.2``) for CV-VAE latents.

CV-VAE's latents have SD's image-latent statistics, so SVD (25 frames) can generate 1+4k latent
frames that CV-VAE decodes to four times as many video frames. The paper closes most of the remaining
gap by training only SVD's last layer, ``diffusion_model.out.2`` (a 3x3 convolution 320 -> 4:
11,524 parameters), with SVD's own objective. This module is that recipe without ComfyUI:

* the objective is EDM with v-prediction as the model's ``model_sampling`` defines it
  (``calculate_denoised``, ``sigma_data``), sigmas drawn log-normally (``p_mean``, ``p_std``) and the
  EDM loss weight ``(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``;
* the model is duck-typed like ComfyUI's ``SVD_img2vid``: ``apply_model(x, sigma, c_concat=...,
  c_crossattn=..., y=..., num_video_frames=...)``, ``encode_adm(fps=..., motion_bucket_id=...,
  augmentation_level=...)``, ``process_latent_in`` and ``diffusion_model.out[2]``;
* everything before the head runs without autograd: the input of ``out.2`` is caught by a forward
  hook during a no-grad pass and the float32 copy of the head is applied to it, so a step costs about
  one forward pass and backward memory is that input only;
* the held-out loss uses fixed sigmas and noise seeds, so the same inputs give the same numbers before
  and after tuning.

The tuned layer is saved as a small .safetensors file (``head.weight``, ``head.bias``, the optimiser
state for resuming, and metadata naming the base model it was tuned on).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..data.clips import DataConfig, RandomClips, fixed_clips, probe_all, split_val
from ..data.manifest import list_sources
from ..errors import CheckpointError, InputError, TrainConfigError
from ..io.video import write_png
from .plot import panel

HEAD_KEY = "diffusion_model.out.2"
FORMAT = "cvvae-svd-head/1"
#: Sigmas of the held-out loss: log-spaced over where SVD's EDM sampling spends its steps.
EVAL_SIGMAS = (0.05, 0.2, 0.7, 2.0, 7.0, 20.0)
PROBE_VALUES = 64  # values of the input convolution kept in a head file to recognise its base model


class BaseModelMismatchError(CheckpointError):
    """A tuned-layer file used with a model it was not tuned for (or a model that is not SVD)."""


# Configuration ---------------------------------------------------------------------------------

@dataclass
class HeadTuneConfig:
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    p_mean: float = 0.7                # log-normal training sigmas: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    fps: int = 6                       # SVD_img2vid_Conditioning's fps (the model sees fps - 1)
    motion_bucket_id: int = 127
    augmentation_level: float = 0.0    # noise added to the first frame's pixels before it is encoded
    eval_sigmas: tuple[float, ...] = EVAL_SIGMAS
    eval_seed: int = 1234

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise TrainConfigError(f"steps and batch must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.learning_rate > 0:
            raise TrainConfigError(f"learning rate must be > 0, got {self.learning_rate}")
        if not self.p_std > 0:
            raise TrainConfigError(f"P_std must be > 0, got {self.p_std}")
        if self.augmentation_level < 0:
            raise TrainConfigError(f"augmentation level must be >= 0, got {self.augmentation_level}")


# The objective ---------------------------------------------------------------------------------

def sample_sigmas(n: int, p_mean: float, p_std: float, generator: torch.Generator) -> torch.Tensor:
    """EDM's log-normal training sigmas."""
    return (p_mean + p_std * torch.randn(n, generator=generator)).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit loss scale at every sigma."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def head_of(model) -> torch.nn.Module:
    """``diffusion_model.out[2]`` of an SVD-like model, checked: a 3x3 convolution to 4 channels."""
    try:
        head = model.diffusion_model.out[2]
    except (AttributeError, IndexError, TypeError):
        head = None
    weight = getattr(head, "weight", None)
    if (head is None or not hasattr(model, "encode_adm") or not hasattr(model, "model_sampling")
            or weight is None or weight.dim() != 4 or weight.shape[0] != 4 or tuple(weight.shape[2:]) != (3, 3)):
        raise BaseModelMismatchError(
            f"expected a Stable Video Diffusion img2vid MODEL (ImageOnlyCheckpointLoader with an SVD checkpoint), "
            f"whose output layer {HEAD_KEY} is a 3x3 convolution to 4 channels; got {type(model).__name__}")
    return head


@dataclass
class Conditioning:
    """One clip's conditioning, as SVD_img2vid_Conditioning makes it from the clip's first frame."""
    image_embeds: torch.Tensor   # [1, D] CLIP vision image embedding
    first_latent: torch.Tensor   # [1, 4, h, w] the VAE's (unscaled) latent of the first frame


@dataclass
class Example:
    latent: torch.Tensor         # [T, 4, h, w] clip latent in the model's scaled space (process_latent_in)
    cond: Conditioning


def model_kwargs(model, conds: list[Conditioning], frames: int, cfg: HeadTuneConfig, device) -> dict:
    """``apply_model`` keyword arguments for clips of ``frames`` latent frames (frames as batch), as
    SVD_img2vid.extra_conds turns SVD_img2vid_Conditioning's output into them."""
    adm = model.encode_adm(fps=cfg.fps, motion_bucket_id=cfg.motion_bucket_id,
                           augmentation_level=cfg.augmentation_level)
    batch = len(conds) * frames
    return {
        "c_concat": torch.cat([c.first_latent.to(device).expand(frames, -1, -1, -1) for c in conds]),
        "c_crossattn": torch.cat([c.image_embeds.to(device).reshape(1, 1, -1).expand(frames, -1, -1) for c in conds]),
        "y": adm.to(device).expand(batch, -1),
        "num_video_frames": frames,
    }


class HeadTuner:
    """A float32 copy of ``out.2`` trained on the frozen model's features. The model itself is never
    changed: its own ``out.2`` runs during the feature pass and is then ignored."""

    def __init__(self, model, cfg: HeadTuneConfig, device):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        base = head_of(model)
        with torch.inference_mode(False):
            self.weight = base.weight.detach().to(self.device, torch.float32).clone().requires_grad_(True)
            self.bias = base.bias.detach().to(self.device, torch.float32).clone().requires_grad_(True)
            self.base_weight, self.base_bias = self.weight.detach().clone(), self.bias.detach().clone()
        self.optimizer = torch.optim.Adam([self.weight, self.bias], lr=cfg.learning_rate)
        self.sigma_data = float(model.model_sampling.sigma_data)

    # Features: the input of out.2 from a no-grad pass -------------------------------------------
    @torch.no_grad()
    def features(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict) -> torch.Tensor:
        caught = []
        handle = head_of(self.model).register_forward_hook(lambda m, args, out: caught.append(args[0]))
        try:
            self.model.apply_model(x, sigma, **kwargs)
        finally:
            handle.remove()
        if len(caught) != 1:
            raise BaseModelMismatchError(f"{HEAD_KEY} ran {len(caught)} times in one forward pass; expected once")
        return caught[0]

    def denoised(self, features, x, sigma, weight=None, bias=None) -> torch.Tensor:
        out = F.conv2d(features.to(self.device, torch.float32), self.weight if weight is None else weight,
                       self.bias if bias is None else bias, padding=1)
        return self.model.model_sampling.calculate_denoised(sigma, out, x)

    def weighted_error(self, denoised, x0, sigma) -> torch.Tensor:
        """Per-frame EDM-weighted squared error (mean over channels and pixels)."""
        err = (denoised.float() - x0.float()).pow(2).flatten(1).mean(1)
        return edm_loss_weight(sigma.float(), self.sigma_data) * err

    def noisy_batch(self, examples: list[Example], sigmas: torch.Tensor, noises: list[torch.Tensor]):
        frames = examples[0].latent.shape[0]
        x0 = torch.cat([e.latent for e in examples]).to(self.device, torch.float32)
        sigma = sigmas.to(self.device, torch.float32).repeat_interleave(frames)
        noise = torch.cat(noises).to(self.device, torch.float32)
        x = x0 + noise * sigma.view(-1, 1, 1, 1)
        return x0, x, sigma, model_kwargs(self.model, [e.cond for e in examples], frames, self.cfg, self.device)

    # Training ----------------------------------------------------------------------------------------
    def step(self, examples: list[Example], generator: torch.Generator) -> float:
        """One optimiser step on ``examples`` (same frame count); returns the batch loss."""
        with torch.inference_mode(False):
            sigmas = sample_sigmas(len(examples), self.cfg.p_mean, self.cfg.p_std, generator)
            noises = [torch.randn(e.latent.shape, generator=generator) for e in examples]
            x0, x, sigma, kwargs = self.noisy_batch(examples, sigmas, noises)
            feats = self.features(x, sigma, kwargs)
            with torch.enable_grad():
                loss = self.weighted_error(self.denoised(feats, x, sigma), x0, sigma).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    # Held-out loss --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: list[Example], heads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Mean EDM-weighted loss over ``examples`` x :attr:`HeadTuneConfig.eval_sigmas` for each named
        (weight, bias), with noise seeded by (eval_seed, clip, sigma): the same inputs give the same
        numbers. One feature pass serves every head."""
        totals = {name: 0.0 for name in heads}
        count = 0
        for k, example in enumerate(examples):
            for j, s in enumerate(self.cfg.eval_sigmas):
                g = torch.Generator().manual_seed(self.cfg.eval_seed * 1_000_003 + k * 1009 + j)
                noise = torch.randn(example.latent.shape, generator=g)
                x0, x, sigma, kwargs = self.noisy_batch([example], torch.tensor([float(s)]), [noise])
                feats = self.features(x, sigma, kwargs)
                for name, (w, b) in heads.items():
                    totals[name] += float(self.weighted_error(self.denoised(feats, x, sigma, w, b), x0, sigma).mean())
                count += 1
        return {name: total / max(count, 1) for name, total in totals.items()}

    def heads(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"base": (self.base_weight, self.base_bias), "tuned": (self.weight.detach(), self.bias.detach())}


@dataclass
class TuneResult:
    step: int                                   # steps done in total (resumed runs included)
    losses: list[tuple[int, float]]             # (step, training loss), resumed runs included
    heldout_before: float | None = None         # held-out loss with the base layer
    heldout_after: float | None = None          # ... with the tuned layer
    interrupted: bool = False


def tune(tuner: HeadTuner, batches: Callable[[int], list[Example]], heldout: list[Example],
         start: int = 0, losses: list[tuple[int, float]] | None = None,
         progress: Callable[[int, int, float], None] | None = None,
         interrupted: Callable[[], bool] | None = None) -> TuneResult:
    """Train from step ``start`` to ``tuner.cfg.steps``; ``batches(step)`` gives that step's examples.
    The step's noise depends on (seed, step) only, so a resumed run draws what an uninterrupted one
    would. ``interrupted()`` is asked before each step: the run then stops with the state of the last
    finished step. ``progress(step, steps, running_loss)`` after each step."""
    cfg = tuner.cfg
    result = TuneResult(step=start, losses=list(losses or []))
    running = None
    for step in range(start, cfg.steps):
        if interrupted is not None and interrupted():
            result.interrupted = True
            break
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        loss = tuner.step(batches(step), generator)
        result.losses.append((step + 1, loss))
        result.step = step + 1
        running = loss if running is None else 0.9 * running + 0.1 * loss
        if progress is not None:
            progress(step + 1, cfg.steps, running)
    if heldout:
        # The base layer's loss needs no pass of its own: the features depend on the noisy input only.
        losses_by_head = tuner.evaluate(heldout, tuner.heads())
        result.heldout_before, result.heldout_after = losses_by_head["base"], losses_by_head["tuned"]
    return result


# Identity of the base model ------------------------------------------------------------------------

def base_identity(model) -> dict:
    """What a head file records about the model it was tuned on: its class, the head's shape and a
    strided sample of the first input convolution's weights (the head itself changes under tuning)."""
    head = head_of(model)
    probe = _probe_tensor(model)
    return {"model_class": type(model).__name__, "head_shape": list(head.weight.shape),
            "probe": [round(float(v), 6) for v in probe]}


def _probe_tensor(model) -> torch.Tensor:
    try:
        w = model.diffusion_model.input_blocks[0][0].weight
    except (AttributeError, IndexError, TypeError):
        raise BaseModelMismatchError(f"expected an SVD img2vid MODEL with diffusion_model.input_blocks.0.0; got "
                                     f"{type(model).__name__}") from None
    flat = w.detach().flatten()
    stride = max(1, flat.numel() // PROBE_VALUES)
    return flat[::stride][:PROBE_VALUES].float().cpu()


def check_identity(meta: dict, model, name: str = "this file"):
    """Raise :class:`BaseModelMismatchError` unless ``model`` is the base model ``meta`` was tuned on
    (the probe is compared with a tolerance: the same checkpoint loaded in fp16 or bf16 matches)."""
    head = head_of(model)
    expected = meta.get("base", {})
    if list(head.weight.shape) != expected.get("head_shape"):
        raise BaseModelMismatchError(
            f"{name} holds an output layer of shape {expected.get('head_shape')}; the connected MODEL's "
            f"{HEAD_KEY} is {list(head.weight.shape)}: use a layer tuned for this model")
    probe = torch.tensor(expected.get("probe", []), dtype=torch.float32)
    mine = _probe_tensor(model)
    scale = float(probe.abs().max()) if probe.numel() else 1.0
    if probe.shape != mine.shape or float((probe - mine).abs().max()) > 1e-2 * scale + 1e-4:
        raise BaseModelMismatchError(
            f"{name} was tuned on another base model ({expected.get('model_class', '?')} with other weights, "
            f"{meta.get('frames', '?')} frames at {meta.get('height', '?')}x{meta.get('width', '?')}); connect the "
            "SVD checkpoint it was tuned on, or tune a layer for this one")


# Files ----------------------------------------------------------------------------------------------

@dataclass
class HeadFile:
    weight: torch.Tensor
    bias: torch.Tensor
    meta: dict
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)   # Adam state, for resuming


def save_head(path, tuner: HeadTuner, meta: dict):
    """Write the tuned layer, its optimiser state and ``meta`` (JSON values) to ``path`` atomically."""
    path = Path(path)
    tensors = {"head.weight": tuner.weight.detach().cpu().contiguous(),
               "head.bias": tuner.bias.detach().cpu().contiguous()}
    state = tuner.optimizer.state_dict()["state"]
    for index, name in enumerate(("weight", "bias")):
        for key, value in state.get(index, {}).items():
            tensors[f"optimizer.{name}.{key}"] = value.detach().float().cpu().reshape(-1).contiguous()
    metadata = {"format": FORMAT, "target": HEAD_KEY, **{k: json.dumps(v) for k, v in meta.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_head(path) -> HeadFile:
    """Read a file written by :func:`save_head`; anything else raises a one-line error."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e}); pick a file written by the tuning node") from None
    if raw.get("format") != FORMAT or "head.weight" not in tensors or "head.bias" not in tensors:
        raise BaseModelMismatchError(
            f"{Path(path).name} is not an SVD output layer tuned by CV-VAE Tune SVD Output Layer (expected "
            f"format {FORMAT} with head.weight / head.bias, got {raw.get('format')!r})")
    meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "target")}
    optimizer = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
    return HeadFile(tensors["head.weight"], tensors["head.bias"], meta, optimizer)


def restore(tuner: HeadTuner, head: HeadFile):
    """Continue from a saved layer: its weights, and Adam's moments when the file has them."""
    if head.weight.shape != tuner.weight.shape:
        raise BaseModelMismatchError(f"the file's layer has shape {list(head.weight.shape)}, the model's "
                                     f"{list(tuner.weight.shape)}: it was tuned for another model")
    with torch.no_grad():
        tuner.weight.copy_(head.weight)
        tuner.bias.copy_(head.bias)
    if head.optimizer and head.meta.get("steps_done"):
        state = {}
        for index, (name, p) in enumerate((("weight", tuner.weight), ("bias", tuner.bias))):
            entry = {}
            for key in ("exp_avg", "exp_avg_sq"):
                value = head.optimizer.get(f"{name}.{key}")
                if value is not None:
                    entry[key] = value.reshape(p.shape).to(p.device)
            step = head.optimizer.get(f"{name}.step")
            if len(entry) == 2 and step is not None:
                entry["step"] = step.reshape(()).clone()
                state[index] = entry
        sd = tuner.optimizer.state_dict()
        sd["state"] = state
        tuner.optimizer.load_state_dict(sd)


def file_meta(model, cfg: HeadTuneConfig, result: TuneResult, frames: int, height: int, width: int,
              data: str) -> dict:
    """The metadata a head file carries (JSON values)."""
    return {"base": base_identity(model), "frames": frames, "height": height, "width": width,
            "steps_done": result.step, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "loss": result.losses[-1][1] if result.losses else None, "losses": result.losses,
            "heldout_before": result.heldout_before, "heldout_after": result.heldout_after, "data": data}


# Loss curve -------------------------------------------------------------------------------------------

def loss_curve(losses: list[tuple[int, float]], heldout: tuple[float | None, float | None] = (None, None)) -> np.ndarray:
    """``[H, W, 3]`` uint8: the training loss per step (log scale), with the held-out loss before and
    after as flat lines when known."""
    if not losses:
        losses = [(0, float("nan"))]
    finite = [(s, v) for s, v in losses if math.isfinite(v)] or [(0, 1.0)]
    series = {"TRAIN LOSS": finite}
    first, last = finite[0][0], finite[-1][0]
    before, after = heldout
    if before is not None:
        series["HELD-OUT BEFORE"] = [(first, before), (last, before)]
    if after is not None:
        series["AFTER"] = [(first, after), (last, after)]
    return panel("SVD OUTPUT LAYER", series, log_scale=True)


def write_loss_curve(path, image: np.ndarray):
    write_png(path, torch.from_numpy(image))


def check_clip_shape(frames: int, height: int, width: int):
    """Clips of 1+4k frames at sizes in multiples of 64 (SVD's UNet halves the latent three times)."""
    if frames < 5 or (frames - 1) % 4:
        raise InputError(f"frames must be 1+4k and at least 5 (5, 9, ..., 97), got {frames}")
    if height % 64 or width % 64 or height < 64 or width < 64:
        raise InputError(f"size must be a multiple of 64 in both directions, got {width}x{height}")


# Training data ------------------------------------------------------------------------------------
# An item is {"video": [3, T, H, W] in [-1, 1]} or {"latent": [4, 1+k, H/8, W/8]} (a latent dataset's
# unscaled mean), with "key" naming the clip in a fixed set (None for clips drawn anew each time); the
# caller turns items into Examples with its own encoders.

@dataclass
class ClipData:
    """Where training and held-out clips come from. ``train(step, i)`` is the i-th clip of a step's batch."""
    describe: str
    train: Callable[[int, int], dict]
    heldout: list[dict]
    finite: bool                       # a fixed set of clips (worth caching encoded)


def video_data(spec: str, frames: int, height: int, width: int, seed: int, heldout: int, log=lambda r: None) -> ClipData:
    """Random clips of a folder's or manifest's videos; ``heldout`` whole videos are kept out of
    training and give one centred clip each (none when there is only one video)."""
    cfg = DataConfig(videos=spec, workers=0)
    sources, problems = list_sources(spec, "videos")
    for p in problems:
        log({"event": "skip", **p})
    held = min(heldout, len(sources) - 1) if len(sources) > 1 else 0
    train_sources, val_sources = split_val(sources, held, seed)
    videos = probe_all(train_sources, frames, cfg, log, "train")
    if not videos:
        raise InputError(f"none of the {len(train_sources)} videos in {spec} has {frames} usable frames; give longer "
                         "videos or fewer frames")
    clips = RandomClips(videos, seed, frames, height, width, None)
    val = fixed_clips(probe_all(val_sources, frames, cfg, log, "val"), len(val_sources), frames, height, width, None, log)
    return ClipData(f"{len(videos)} videos in {spec}", lambda step, i: {"video": clips[(step, i)]["video"], "key": None},
                    [{"video": v, "key": ("heldout", k)} for k, v in enumerate(val)], finite=False)


def latent_data(dataset, frames: int, height: int, width: int, seed: int, heldout: int, spatial: int = 8) -> ClipData:
    """Clips of a latent dataset (``cvvae encode-dataset``) with 1+(frames-1)/4 latent frames at the size;
    the last ``heldout`` of them (in the index's order: the last videos) are kept out of training."""
    want = ((frames - 1) // 4 + 1, height // spatial, width // spatial)
    items = [i for i, r in enumerate(dataset.records) if tuple(r["latent_shape"][1:]) == want]
    if not items:
        shapes = sorted({tuple(r["latent_shape"]) for r in dataset.records})
        raise InputError(f"the latent dataset has no clip of {frames} frames at {width}x{height} (latent [C, "
                         f"{want[0]}, {want[1]}, {want[2]}]); it has {shapes[:4]}: set frames/width/height to match")
    held = min(heldout, len(items) - 1)
    train, val = items[:len(items) - held], items[len(items) - held:]

    def latent(k):
        z = dataset[k][0]
        return {"latent": z[:4] if z.shape[0] >= 8 else z, "key": k}   # mean+logvar datasets: the mean

    def pick(step, i):
        return latent(train[torch.randint(len(train), (1,), generator=torch.Generator().manual_seed(
            (seed * 1_000_003 + step) * 1009 + i)).item()])

    return ClipData(f"{len(train)} latent clips", pick, [latent(k) for k in val], finite=True)


def image_data(images: torch.Tensor, frames: int, height: int, width: int, heldout: int) -> ClipData:
    """Consecutive clips of ``frames`` frames cut from an IMAGE batch ``[N, H, W, 3]`` in 0..1, resized to
    the size; the last ``heldout`` clips are kept out of training (none when there is only one)."""
    count = images.shape[0] // frames
    if count < 1:
        raise InputError(f"images has {images.shape[0]} frames; a clip needs {frames}")
    video = images[: count * frames, :, :, :3].movedim(-1, 1).float()
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    clips = [(video[k * frames:(k + 1) * frames] * 2 - 1).movedim(0, 1).contiguous() for k in range(count)]
    held = min(heldout, count - 1)
    train, val = clips[:count - held], clips[count - held:]

    def train_item(step, i):
        k = (step * 7919 + i) % len(train)
        return {"video": train[k], "key": k}
    return ClipData(f"{len(train)} clips from the images", train_item, [{"video": v, "key": ("heldout", k)} for k, v in enumerate(val)],
                    finite=True)


def scaled_latent(model, raw: torch.Tensor) -> torch.Tensor:
    """A raw CV-VAE latent ``[1, 4, t, h, w]`` or ``[4, t, h, w]`` as SVD's frames-as-batch input
    ``[t, 4, h, w]`` in the model's latent scaling (``process_latent_in``: SD's 0.18215)."""
    raw = raw[0] if raw.dim() == 5 else raw
    return model.process_latent_in(raw.movedim(1, 0).float())
