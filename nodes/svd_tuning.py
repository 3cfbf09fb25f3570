"""Nodes that tune SVD's output layer for CV-VAE latents and apply the tuned layer (glue over
cvvae_core.train.svd_head: ComfyUI's MODEL, CLIP_VISION and VAE in, a small .safetensors out)."""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..cvvae_core.data.clips import seed_of
from ..cvvae_core.data.latent_dataset import LatentDataset
from ..cvvae_core.errors import CVVAEError
from ..cvvae_core.tiling import ENCODE
from ..cvvae_core.train import svd_head
from . import runtime
from .comfy_vae import get_cvvae

CATEGORY = "CV-VAE/SVD"
HEAD_FOLDER = "cvvae_svd_heads"
TUNE_NODE = "CV-VAE Tune SVD Output Layer"
APPLY_NODE = "CV-VAE Apply SVD Output Layer"
log = logging.getLogger("CV-VAE")


def register_head_folder():
    """``models/cvvae_svd_heads`` (plus any ``cvvae_svd_heads:`` entry in extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, HEAD_FOLDER)
    if HEAD_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[HEAD_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[HEAD_FOLDER] = (paths, set(exts) | {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[HEAD_FOLDER] = ([default], {".safetensors"})


register_head_folder()


def head_path(name: str) -> str:
    """Where the tuning node writes ``name`` (the first folder of the list: models/cvvae_svd_heads)."""
    base = os.path.basename(name.strip())
    if not base or base in (".", ".."):
        raise ValueError(f"{TUNE_NODE}: give the layer a file name (e.g. svd_cvvae_head), got {name!r}")
    if not base.endswith(".safetensors"):
        base += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths(HEAD_FOLDER)[0], base)


class ComfyEncoders:
    """Turns clips into :class:`svd_head.Example`s with the graph's own CLIP vision model and CV-VAE,
    the way SVD_img2vid_Conditioning conditions at inference."""

    def __init__(self, model, clip_vision, vae, cfg: svd_head.HeadTuneConfig, cache: bool):
        self.model, self.clip_vision, self.vae, self.cfg = model, clip_vision, vae, cfg
        self.cvvae = get_cvvae(vae, TUNE_NODE)
        self.choice = runtime.Tiling("auto", 0, 0, False, node=TUNE_NODE)
        self.cache = {} if cache else None

    def example(self, item: dict) -> svd_head.Example:
        key = item["key"]
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        if "video" in item:
            video = item["video"].unsqueeze(0)                                   # [1, 3, T, H, W]
            raw = self.encode_video(video)
            first = ((video[:, :, 0] + 1) / 2).clamp(0, 1).movedim(1, -1)       # [1, H, W, 3]
        else:
            raw = item["latent"].unsqueeze(0)
            first = self.vae.decode(raw[:, :, :1].to(self.vae.output_device))   # a latent frame -> its image
            first = first.reshape(1, *first.shape[-3:])[..., :3].float()
        example = svd_head.Example(svd_head.scaled_latent(self.model, raw), self.conditioning(first, key))
        if self.cache is not None and key is not None:
            self.cache[key] = example
        return example

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        opts = self.choice.options(self.vae.output_device)
        with runtime.comfy_pass(self.vae, ENCODE, video.shape, self.choice, opts) as opts:
            return self.cvvae.encode(video, tiling=opts).float()

    def conditioning(self, image: torch.Tensor, key) -> svd_head.Conditioning:
        """SVD_img2vid_Conditioning's positive: CLIP image embedding, and the VAE's latent of the
        (noise-augmented) frame."""
        embeds = self.clip_vision.encode_image(image).image_embeds
        pixels = image[:, :, :, :3]
        if self.cfg.augmentation_level > 0:
            g = torch.Generator().manual_seed(seed_of(self.cfg.seed, "augmentation", key) % 2 ** 31)
            pixels = pixels + torch.randn(pixels.shape, generator=g) * self.cfg.augmentation_level
        return svd_head.Conditioning(embeds.float().cpu(), self.vae.encode(pixels).float().cpu())


def clip_data(data: str, images, frames, height, width, seed, heldout) -> svd_head.ClipData:
    data = (data or "").strip()
    if images is not None and data:
        raise ValueError(f"{TUNE_NODE}: connect 'images' or give 'data' (a folder, manifest or latent dataset), not both")
    if images is not None:
        return svd_head.image_data(images, frames, height, width, heldout)
    if not data:
        raise ValueError(f"{TUNE_NODE}: give 'data' (a folder of videos, a .txt/.csv/.jsonl manifest, or a folder "
                         "written by `cvvae encode-dataset`), or connect 'images'")
    if os.path.isfile(os.path.join(data, "index.jsonl")):
        return svd_head.latent_data(LatentDataset(data), frames, height, width, seed, heldout)
    return svd_head.video_data(data, frames, height, width, seed, heldout,
                               log=lambda r: log.warning("%s: skipped %s: %s", TUNE_NODE, r.get("path"), r.get("reason")))


class CVVAETuneSVDOutputLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAETuneSVDOutputLayer", display_name=TUNE_NODE, category=CATEGORY,
            description="Tunes only SVD's output layer (out.2, 11,524 parameters) so that SVD generates CV-VAE "
                        "latents: 25 latent frames decode to 97 video frames. SVD's own objective (EDM, "
                        "v-prediction), conditioned as SVD_img2vid_Conditioning does; the rest of SVD stays frozen "
                        "and runs without gradients, so a step costs about one UNet forward. Reports the held-out "
                        "denoising loss before and after. Writes models/cvvae_svd_heads/<name>.safetensors for "
                        "'CV-VAE Apply SVD Output Layer'.",
            inputs=[
                io.Model.Input("model", tooltip="The SVD img2vid model (ImageOnlyCheckpointLoader) you will generate with."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model from the same checkpoint loader."),
                io.Vae.Input("vae", tooltip="The VAE from 'Load CV-VAE' (4 latent channels: vae3d / vae3d_v1-1)."),
                io.String.Input("name", default="svd_cvvae_head",
                                tooltip="File name of the tuned layer in models/cvvae_svd_heads."),
                io.Int.Input("steps", default=500, min=1, max=100000,
                             tooltip="Total optimiser steps (the paper: 5000). With resume on, a run continues up to this."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Adam learning rate of the output layer."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips per optimiser step (memory grows with it)."),
                io.Int.Input("frames", default=97, min=5, max=1025, step=4,
                             tooltip="Frames per training clip, 1+4k: 97 frames = 25 latent frames, SVD-XT's length."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=64, tooltip="Clip width (multiple of 64)."),
                io.Int.Input("height", default=576, min=64, max=4096, step=64, tooltip="Clip height (multiple of 64)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, control_after_generate=True,
                             tooltip="Seeds clip choice and noise: the same seed gives the same losses."),
                io.Float.Input("p_mean", default=0.7, min=-5.0, max=5.0, step=0.05,
                               tooltip="Training sigmas are log-normal: mean of ln(sigma) (SVD: 0.7)."),
                io.Float.Input("p_std", default=1.6, min=0.05, max=5.0, step=0.05,
                               tooltip="Standard deviation of ln(sigma) (SVD: 1.6)."),
                io.Int.Input("fps", default=6, min=1, max=1024,
                             tooltip="The fps you give SVD_img2vid_Conditioning when generating (the example "
                                     "workflows: 6)."),
                io.Int.Input("motion_bucket_id", default=127, min=1, max=1023,
                             tooltip="As in SVD_img2vid_Conditioning."),
                io.Float.Input("augmentation_level", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="As in SVD_img2vid_Conditioning: noise on the first frame before it is encoded."),
                io.Int.Input("heldout_clips", default=2, min=0, max=64,
                             tooltip="Clips (whole videos for a video folder) kept out of training to measure the "
                                     "denoising loss before and after."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue the file 'name' when it exists (same model, frames and size); "
                                         "off starts over and replaces it."),
                io.String.Input("data", default="", optional=True,
                                tooltip="A folder of videos, a .txt/.csv/.jsonl manifest, or a latent dataset folder "
                                        "written by `cvvae encode-dataset` (encoded once). Leave empty when 'images' "
                                        "is connected."),
                io.Image.Input("images", optional=True,
                               tooltip="Instead of 'data': frames cut into consecutive clips of 'frames' frames."),
            ],
            outputs=[io.String.Output(display_name="layer_name"),
                     io.Image.Output(display_name="loss_curve"),
                     io.String.Output(display_name="report")])

    @classmethod
    def execute(cls, model, clip_vision, vae, name, data="", images=None, steps=500, learning_rate=1e-4,
                batch_size=1, frames=97, width=1024, height=576, seed=0, p_mean=0.7, p_std=1.6, fps=6,
                motion_bucket_id=127, augmentation_level=0.0, heldout_clips=2, resume=True):
        try:
            return cls.run(model, clip_vision, vae, name, data, images, steps, learning_rate, batch_size, frames,
                           width, height, seed, p_mean, p_std, fps, motion_bucket_id, augmentation_level,
                           heldout_clips, resume)
        except CVVAEError as e:
            raise ValueError(f"{TUNE_NODE}: {e}") from None

    @classmethod
    def run(cls, model, clip_vision, vae, name, data, images, steps, learning_rate, batch_size, frames, width,
            height, seed, p_mean, p_std, fps, motion_bucket_id, augmentation_level, heldout_clips, resume):
        base = model.model
        svd_head.head_of(base)
        svd_head.check_clip_shape(frames, height, width)
        get_cvvae(vae, TUNE_NODE)
        cfg = svd_head.HeadTuneConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                      p_mean=p_mean, p_std=p_std, fps=fps, motion_bucket_id=motion_bucket_id,
                                      augmentation_level=augmentation_level)
        path = head_path(name)
        previous = None
        if resume and os.path.isfile(path):
            previous = svd_head.load_head(path)
            try:
                svd_head.check_identity(previous.meta, base, os.path.basename(path))
            except svd_head.BaseModelMismatchError as e:
                raise ValueError(f"{TUNE_NODE}: resume: {e}; or give another name, or turn resume off to start "
                                 "over") from None
            if (previous.meta.get("frames"), previous.meta.get("height"), previous.meta.get("width")) != (frames, height, width):
                raise ValueError(f"{TUNE_NODE}: {os.path.basename(path)} was tuned on {previous.meta.get('frames')} frames "
                                 f"at {previous.meta.get('width')}x{previous.meta.get('height')}; use those, another "
                                 "name, or turn resume off")
        source = clip_data(data, images, frames, height, width, seed, heldout_clips)

        mm.load_models_gpu([model])
        tuner = svd_head.HeadTuner(base, cfg, model.load_device)
        start, losses = 0, []
        if previous is not None:
            svd_head.restore(tuner, previous)
            start, losses = int(previous.meta.get("steps_done", 0)), [tuple(p) for p in previous.meta.get("losses", [])]
        encoders = ComfyEncoders(base, clip_vision, vae, cfg, cache=source.finite)
        heldout = [encoders.example(item) for item in source.heldout]

        def batches(step):
            mm.load_models_gpu([model])  # the VAE and CLIP passes may have moved SVD off the device
            items = [source.train(step, i) for i in range(cfg.batch_size)]
            return [encoders.example(item) for item in items]

        pbar = comfy.utils.ProgressBar(steps)
        pbar.update_absolute(min(start, steps), steps)

        def progress(step, total, running):
            pbar.update_absolute(step, total)
            runtime.show_progress_text(f"step {step}/{total}  loss {running:.4f}")

        result = svd_head.tune(tuner, batches, heldout, start, losses, progress, mm.processing_interrupted)
        meta = svd_head.file_meta(base, cfg, result, frames, height, width, source.describe)
        svd_head.save_head(path, tuner, meta)
        curve = svd_head.loss_curve(result.losses, (result.heldout_before, result.heldout_after))
        svd_head.write_loss_curve(path[: -len(".safetensors")] + ".loss.png", curve)
        report = report_text(os.path.basename(path), result, len(heldout))
        log.info("%s: %s", TUNE_NODE, report)
        mm.throw_exception_if_processing_interrupted()   # Cancel: the state of the last finished step is saved
        return io.NodeOutput(os.path.basename(path), torch.from_numpy(curve).float().div(255).unsqueeze(0), report)


def report_text(name: str, result: svd_head.TuneResult, heldout: int) -> str:
    loss = f"{result.losses[-1][1]:.4f}" if result.losses else "-"
    lines = [f"{name}: {result.step} steps, last training loss {loss}"
             + (" (cancelled: saved at the last finished step)" if result.interrupted else "")]
    if heldout:
        change = (result.heldout_after - result.heldout_before) / result.heldout_before * 100
        lines.append(f"held-out denoising loss on {heldout} clips: {result.heldout_before:.4f} before, "
                     f"{result.heldout_after:.4f} after ({change:+.1f}%)")
    else:
        lines.append("no held-out clips (give 2+ videos or clips and heldout_clips >= 1 to measure the change)")
    return "\n".join(lines)


class CVVAEApplySVDOutputLayer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAEApplySVDOutputLayer", display_name=APPLY_NODE, category=CATEGORY,
            description="Puts a tuned output layer (from 'CV-VAE Tune SVD Output Layer') into an SVD img2vid MODEL "
                        "as a weight patch (no copy of the model; removed with the node). Then generate 25 latent "
                        "frames and decode with 'CV-VAE Latent Adapter' (batch_to_video) + 'CV-VAE Video Decode' "
                        "for 97 frames.",
            inputs=[
                io.Model.Input("model", tooltip="The SVD img2vid model the layer was tuned on."),
                io.Combo.Input("layer_name", options=folder_paths.get_filename_list(HEAD_FOLDER),
                               tooltip="A tuned layer in models/cvvae_svd_heads."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")])

    @classmethod
    def execute(cls, model, layer_name):
        path = folder_paths.get_full_path(HEAD_FOLDER, layer_name)
        if path is None:
            raise FileNotFoundError(f"{APPLY_NODE}: '{layer_name}' is not in models/{HEAD_FOLDER}; tune one with "
                                    f"'{TUNE_NODE}' or copy it there, then press R to refresh the list")
        try:
            head = svd_head.load_head(path)
            svd_head.check_identity(head.meta, model.model, layer_name)
        except CVVAEError as e:
            raise ValueError(f"{APPLY_NODE}: {e}") from None
        patched = model.clone()
        keys = patched.add_patches({f"{svd_head.HEAD_KEY}.weight": ("set", (head.weight,)),
                                    f"{svd_head.HEAD_KEY}.bias": ("set", (head.bias,))}, 1.0, 1.0)
        if len(keys) != 2:
            raise ValueError(f"{APPLY_NODE}: the MODEL has no {svd_head.HEAD_KEY} weight and bias to patch; expected an "
                             "SVD img2vid model")
        return io.NodeOutput(patched)


SVD_NODES = [CVVAETuneSVDOutputLayer, CVVAEApplySVDOutputLayer]
