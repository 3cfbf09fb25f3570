"""Crop across tile borders at a time-chunk border: untiled (top) vs official (middle) vs seamless
(bottom), built-in model, 17 frames of a clip at 144x256. Writes docs/seam_crop.png and prints the
difference to the untiled result inside the tile-border band and the extra frame-to-frame change.

    python bench/seam_crop.py CLIP.mp4
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cvvae_core import load_model, metrics
from cvvae_core.tiling import TilingOptions
from cvvae_core.io.video import read_video, to_model_range, to_uint8, write_png
torch.set_num_threads(1)
model = load_model("builtin")
frames, _ = read_video(sys.argv[1], max_frames=17, height=144, width=256)
x = to_model_range(frames)
z = model.encode(x)
ref = model.decode(z)
off = model.decode(z, tiling=TilingOptions(mode="official", tile_size=72, chunk_frames=8))
sea = model.decode(z, tiling=TilingOptions(mode="seamless", tile_size=64, chunk_frames=4))
print("official vs untiled PSNR", metrics.psnr(off, ref), "seamless vs untiled PSNR", metrics.psnr(sea, ref))
# official decode tiles: latent tile 9, stride 7 -> pixel borders at 56, 112, ... ; blend band 56..72
t = 8  # frame 8 = first frame of the second official time chunk (latents [2,..]) -> chunk border in time
rows = []
for v in (ref, off, sea):
    u = to_uint8(v)  # [T,H,W,3]
    crop = u[t, 24:104, 16:136]  # spans column borders at 56 and 112
    rows.append(crop)
strip = torch.cat(rows, dim=0)
strip = strip.repeat_interleave(3, 0).repeat_interleave(3, 1)
write_png(ROOT / "docs" / "seam_crop.png", strip)
for name, v in (("official", off), ("seamless", sea)):
    d = (v - ref).abs()
    band = d[..., 48:80].mean().item()
    rest = d.mean().item()
    # temporal flicker at the chunk border: frame-to-frame change vs untiled's
    dt = ((v[:, :, 1:] - v[:, :, :-1]) - (ref[:, :, 1:] - ref[:, :, :-1])).abs().mean(dim=(0, 1, 3, 4))
    print(f"{name}: mean|diff| in column band 48-80 {band:.4f}, whole frame {rest:.4f}; max {d.max():.4f}; "
          f"extra frame-to-frame change per transition: {[round(float(a), 4) for a in dt]}")
