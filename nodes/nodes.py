"""The CV-VAE nodes (ComfyUI node API v3: comfy_api.latest). Thin glue over cvvae_core."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import folder_paths

from ..cvvae_core.io import builtin
from ..cvvae_core.io.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from ..cvvae_core.spec import IMAGE_FAMILIES, PRESETS
from ..cvvae_core.errors import CheckpointError, CheckpointNotFoundError
from ..cvvae_core.model.frames import FrameAdjustment, FramedLatent, conform
from ..cvvae_core.tiling import DECODE, ENCODE
from . import runtime
from .comfy_vae import get_cvvae, load_comfy_vae
from .svd_tuning import SVD_NODES

CATEGORY = "CV-VAE"
MODEL_FOLDER = "cvvae"
BUILTIN_NAME = "builtin (small demo model)"
ADJUSTMENT_KEY = "cvvae_adjustment"
FRAME_POLICIES = ["pad", "trim", "error"]
LOADABLE_EXTENSIONS = frozenset(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)


# Model files ---------------------------------------------------------------------------------
def loadable(name: str) -> bool:
    """Whether Load CV-VAE can read a file of this name (ComfyUI's model lists also offer formats such as
    .pt2 that no weights loader reads)."""
    return os.path.splitext(name)[1].lower() in LOADABLE_EXTENSIONS


def register_model_folder():
    """``models/cvvae`` (plus any ``cvvae:`` entry in extra_model_paths.yaml) as a model folder."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    exts = set(folder_paths.supported_pt_extensions) & LOADABLE_EXTENSIONS
    if MODEL_FOLDER in folder_paths.folder_names_and_paths:
        paths, old = folder_paths.folder_names_and_paths[MODEL_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(old) | exts)
    else:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = ([default], exts)


def builtin_path() -> str | None:
    """The shipped demo model, or None when this copy of the pack lacks its weights."""
    try:
        return os.fspath(builtin.builtin_path())
    except CheckpointNotFoundError:
        return None


def model_choices() -> list[str]:
    names = []
    if builtin_path():
        names.append(BUILTIN_NAME)
    for folder in (MODEL_FOLDER, "vae"):
        for name in folder_paths.get_filename_list(folder):
            if loadable(name) and name not in names:
                names.append(name)
    return names


def model_path(name: str) -> str:
    if name == BUILTIN_NAME:
        path = builtin_path()
        if path is None:
            raise FileNotFoundError("The built-in CV-VAE demo model is not installed with this copy of the "
                                    "pack. Reinstall the pack, or pick a vae3d / vae3d_sd3 file.")
        return path
    for folder in (MODEL_FOLDER, "vae"):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(f"CV-VAE model '{name}' not found in models/{MODEL_FOLDER} or models/vae. "
                            "Put the file there (see the pack's README) and press R to refresh the list.")


# Nodes -----------------------------------------------------------------------------------------
class CVVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAELoader", display_name="Load CV-VAE", category=CATEGORY,
            description="Loads a CV-VAE video VAE (vae3d, vae3d_v1-1: 4 latent channels, SD/SVD; vae3d_sd3: "
                        "16 channels, SD3). Its VAE output works with the CV-VAE video nodes and with core VAE "
                        "nodes: VAE Encode encodes each image on its own (the 4D latent batch SD/SVD sample); VAE "
                        "Decode decodes a 4D latent batch frame by frame and a 5D video latent as video. Every "
                        "pass runs the exact engine, also VAE Decode (Tiled) / VAE Encode (Tiled) (their tile and "
                        "temporal sizes set the piece sizes, overlaps are not needed) and ComfyUI's out-of-memory "
                        "retry: same result as untiled, sized to the free memory.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(),
                               tooltip="CV-VAE weights from models/cvvae or models/vae (a release's "
                                       "diffusion_pytorch_model.safetensors, renamed or in its folder), or "
                                       "the small built-in demo model."),
                io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Working precision; the model is built straight in it (one copy of the "
                                       "weights in memory). auto = ComfyUI's VAE precision (fp32 on CPU, bf16/fp16 "
                                       "on GPUs; follows --fp16-vae/--bf16-vae/--fp32-vae). fp16/bf16 halve the "
                                       "memory of weights and activations."),
            ],
            outputs=[io.Vae.Output(display_name="VAE")])

    @classmethod
    def execute(cls, model_name, dtype="auto"):
        path = model_path(model_name)
        try:
            vae = load_comfy_vae(path, dtype, name=model_name)
        except CheckpointError as e:
            hint = ("" if isinstance(e, CheckpointNotFoundError) else
                    " Load CV-VAE needs a CV-VAE release file (vae3d, vae3d_v1-1 or vae3d_sd3); image VAEs and "
                    "checkpoints belong in core 'Load VAE' / 'Load Checkpoint'.")
            raise type(e)(f"Load CV-VAE could not use '{model_name}': {e}{hint}") from None
        return io.NodeOutput(vae)


def tiling_inputs() -> list:
    """The tiling knobs shared by Video Encode and Video Decode."""
    return [
        io.Combo.Input("tiling", options=runtime.TILING_MODES, default="auto", tooltip=runtime.TILING_TOOLTIP),
        io.Int.Input("tile_size", default=0, min=0, max=4096, step=8, tooltip=runtime.TILE_SIZE_TOOLTIP),
        io.Int.Input("chunk_frames", default=0, min=0, max=4097, step=1, tooltip=runtime.CHUNK_TOOLTIP),
        # optional: prompts saved before this input existed stay valid
        io.Boolean.Input("disk_spill", default=False, optional=True, tooltip=runtime.DISK_SPILL_TOOLTIP),
    ]


class CVVAEVideoEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAEVideoEncode", display_name="CV-VAE Video Encode", category=CATEGORY,
            description="Encodes IMAGE frames as ONE video: N frames -> a 5D latent [1, C, 1+(N-1)/4, H/8, W/8]. "
                        "With tiling auto, seamless or none the result is the same (the exact engine): tiling "
                        "trades memory for time.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE from 'Load CV-VAE'."),
                io.Image.Input("images", tooltip="Video frames [N, H, W, 3] in 0..1, in time order."),
                io.Combo.Input("frame_policy", options=FRAME_POLICIES, default="pad",
                               tooltip="CV-VAE needs 1+4k frames (1, 5, 9, 17, ...) and sizes divisible by 8. "
                                       "pad = repeat the last frame/edge pixels, removed again by CV-VAE Video "
                                       "Decode; trim = drop the extra frames/pixels; error = stop and say so."),
                *tiling_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")])

    @classmethod
    def execute(cls, vae, images, frame_policy="pad", tiling="auto", tile_size=0, chunk_frames=0, disk_spill=False):
        node = "CV-VAE Video Encode"
        model = get_cvvae(vae, node)
        choice = runtime.Tiling(tiling, tile_size, chunk_frames, disk_spill, node=node)
        video, adjust = conform(runtime.images_to_video(images), model.config, frame_policy)
        pbar = runtime.progress_bar()
        opts = choice.options(vae.output_device, pbar)
        with runtime.comfy_pass(vae, ENCODE, video.shape, choice, opts) as opts:
            latent = model.encode(video, tiling=opts)
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(1, 1)
        latent = latent.to(vae.output_device, runtime.output_dtype())
        result = {"samples": latent}
        if adjust.changed:
            result[ADJUSTMENT_KEY] = {**vars(adjust), "latent_shape": list(latent.shape)}
        return io.NodeOutput(result)


class CVVAEVideoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAEVideoDecode", display_name="CV-VAE Video Decode", category=CATEGORY,
            description="Decodes a 5D video latent [B, C, 1+k, h, w] to 1+4k IMAGE frames per video (also one "
                        "loaded with Load Latent). For a 4D frames-as-batch latent (SD/SVD) first use 'CV-VAE Latent "
                        "Adapter' (batch_to_video). With tiling auto, seamless or none the frames are the same "
                        "(the exact engine).",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE from 'Load CV-VAE'; its channels (4 or 16) must match the latent."),
                io.Latent.Input("samples", tooltip="A 5D video latent, e.g. from CV-VAE Video Encode or the adapter. "
                                                   "Padding recorded by Video Encode is removed again."),
                *tiling_inputs(),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")])

    @classmethod
    def execute(cls, vae, samples, tiling="auto", tile_size=0, chunk_frames=0, disk_spill=False):
        node = "CV-VAE Video Decode"
        model = get_cvvae(vae, node)
        latent = samples["samples"]
        if latent.dim() == 4:
            raise ValueError(
                f"CV-VAE Video Decode got a 4D latent {list(latent.shape)}: that is a frames-as-batch image latent "
                "(SD/SVD). Put 'CV-VAE Latent Adapter' (mode batch_to_video) in front to decode the batch as one "
                "video (4x the frames), or use core VAE Decode to decode each frame as an image.")
        check_channels(latent, vae, node)
        adjust = recorded_adjustment(samples, latent)
        choice = runtime.Tiling(tiling, tile_size, chunk_frames, disk_spill, node=node)
        pbar = runtime.progress_bar()
        opts = choice.options(vae.output_device, pbar)
        with runtime.comfy_pass(vae, DECODE, latent.shape, choice, opts) as opts:
            video = model.decode(FramedLatent(latent, adjust), tiling=opts)
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(1, 1)
        return io.NodeOutput(runtime.video_to_images(video.to(vae.output_device)))


def recorded_adjustment(samples: dict, latent: torch.Tensor) -> FrameAdjustment:
    """The padding Video Encode recorded, if this latent still has the shape it was recorded for."""
    rec = samples.get(ADJUSTMENT_KEY)
    if not rec or list(rec.get("latent_shape", [])) != list(latent.shape):
        return FrameAdjustment()
    return FrameAdjustment(**{k: int(rec.get(k, 0)) for k in ("padded_frames", "padded_height", "padded_width")})


def releases(channels: int) -> list[str]:
    """The CV-VAE releases whose latents have ``channels`` channels."""
    return [name for name, cfg in PRESETS.items() if cfg.latent_channels == channels]


def channel_owner(channels: int) -> str:
    """Who makes latents with this many channels (the image VAE families and CV-VAE releases of cvvae_core.spec)."""
    if not releases(channels):
        return "not a CV-VAE latent"
    families = [f.description for f in IMAGE_FAMILIES.values() if f.latent_channels == channels]
    return ", ".join(families) + "; CV-VAE " + " / ".join(releases(channels))


def check_channels(latent: torch.Tensor, vae, node: str):
    want = getattr(vae, "latent_channels", None) if vae is not None else None
    have = latent.shape[1]
    if want is not None and have != want:
        hint = (f"Load the matching CV-VAE ({' / '.join(releases(have))} for this latent), or check"
                if releases(have) else "Check")
        raise ValueError(
            f"{node}: the latent has {have} channels ({channel_owner(have)}) but the VAE "
            f"'{getattr(vae, 'name', type(vae).__name__)}' uses {want} ({channel_owner(want)}). {hint} "
            f"that the latent is [B, C, T, h, w] / [T, C, h, w].")
    if want is None and not releases(have):
        known = sorted({cfg.latent_channels for cfg in PRESETS.values()})
        raise ValueError(f"{node}: the latent has {have} channels; CV-VAE latents have "
                         f"{' or '.join(map(str, known))}. Shape {list(latent.shape)}: is this latent from another "
                         "model family?")


class CVVAELatentAdapter(io.ComfyNode):
    MODES = ["auto", "video_to_batch", "batch_to_video"]

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAELatentAdapter", display_name="CV-VAE Latent Adapter (video <-> frames batch)",
            category=CATEGORY,
            description="Converts between a 5D video latent [B, C, T, h, w] (CV-VAE Video Encode/Decode) and the 4D "
                        "frames-as-batch latent [T, C, h, w] that SD/SVD sampling uses. Decoding an SVD batch with "
                        "batch_to_video + CV-VAE Video Decode gives 4x the frames (1+4(T-1)).",
            inputs=[
                io.Latent.Input("samples", tooltip="A 5D video latent or a 4D frames-as-batch latent."),
                io.Combo.Input("mode", options=cls.MODES, default="auto",
                               tooltip="video_to_batch: each latent frame becomes one image latent [B*T, C, h, w] "
                                       "(for SD/SVD sampling or core VAE Decode). batch_to_video: the whole batch "
                                       "becomes one latent video [1, C, N, h, w] (for CV-VAE Video Decode). auto: "
                                       "5D -> batch, 4D -> video."),
                io.Int.Input("target_frames", default=0, min=0, max=4096,
                             tooltip="Latent frames (= batch size on the 4D side) to output. 0 = keep. More = "
                                     "repeat the last latent frame; fewer = drop trailing frames. E.g. 14 for "
                                     "SVD's 14 frames."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the VAE the latent will be used with; its channel count (4 or 16) "
                                     "is checked against the latent."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")])

    @classmethod
    def execute(cls, samples, mode="auto", target_frames=0, vae=None):
        latent = samples["samples"]
        if latent.dim() not in (4, 5):
            raise ValueError(f"CV-VAE Latent Adapter needs a 4D or 5D latent, got shape {list(latent.shape)}.")
        check_channels(latent, vae, "CV-VAE Latent Adapter")
        if mode == "auto":
            mode = "video_to_batch" if latent.dim() == 5 else "batch_to_video"
        if mode not in cls.MODES:
            raise ValueError(f"mode must be one of {cls.MODES}, got {mode!r}")
        if mode == "video_to_batch":
            if latent.dim() != 5:
                raise ValueError(f"video_to_batch needs a 5D video latent [B, C, T, h, w]; got {list(latent.shape)} "
                                 "(already a frames batch: use batch_to_video or auto).")
            out = latent.movedim(2, 1).reshape(-1, latent.shape[1], *latent.shape[-2:])  # [B*T, C, h, w]
            out = fit_frames(out, 0, target_frames)
        else:
            if latent.dim() != 4:
                raise ValueError(f"batch_to_video needs a 4D frames-as-batch latent [T, C, h, w]; got "
                                 f"{list(latent.shape)} (already a video latent: use video_to_batch or auto).")
            out = fit_frames(latent.movedim(0, 1).unsqueeze(0), 2, target_frames)  # [1, C, T, h, w]
        result = {"samples": out.contiguous()}
        rec = samples.get(ADJUSTMENT_KEY)
        if rec is not None:  # kept; Video Decode applies it only while the shape still matches
            result[ADJUSTMENT_KEY] = rec
        return io.NodeOutput(result)


def fit_frames(latent: torch.Tensor, dim: int, target: int) -> torch.Tensor:
    have = latent.shape[dim]
    if not target or target == have:
        return latent
    if target < have:
        return latent.narrow(dim, 0, target)
    last = latent.narrow(dim, have - 1, 1)
    return torch.cat([latent] + [last] * (target - have), dim=dim)


class CVVAESyntheticVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CVVAESyntheticVideo", display_name="CV-VAE Synthetic Test Clip", category=CATEGORY + "/testing",
            description="Renders a procedural test clip (panning texture, moving shapes, lighting change) as IMAGE "
                        "frames, so a workflow runs without any input video (e.g. to check an install). It is the "
                        "kind of content the built-in demo model was trained on (64x64).",
            inputs=[
                io.Int.Input("width", default=64, min=8, max=4096, step=8, tooltip="Frame width in pixels."),
                io.Int.Input("height", default=64, min=8, max=4096, step=8, tooltip="Frame height in pixels."),
                io.Int.Input("frames", default=17, min=1, max=1024,
                             tooltip="Number of frames. CV-VAE works in 1+4k frames (1, 5, 9, 13, 17, ...)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Which clip to draw; the same seed always gives the same clip."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")])

    @classmethod
    def execute(cls, width=64, height=64, frames=17, seed=0):
        return io.NodeOutput(synthetic_clip(frames, height, width, seed))


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """IMAGE ``[frames, height, width, 3]`` in 0..1 from :func:`cvvae_core.data.synthetic.generate_clip`."""
    from ..cvvae_core.data.synthetic import SyntheticConfig, generate_clip

    clip = generate_clip(seed, SyntheticConfig(frames=frames, height=height, width=width))  # [3, T, H, W]
    return ((clip.movedim(0, -1) + 1.0) / 2.0).clamp(0.0, 1.0).float()


NODES = [CVVAELoader, CVVAEVideoEncode, CVVAEVideoDecode, CVVAELatentAdapter, CVVAESyntheticVideo, *SVD_NODES]
