"""The tiling engine: exact (``seamless``) and ``official`` tiled encode/decode in bounded memory.

    from cvvae_core.tiling import TilingOptions
    z = vae.encode(video, tiling=TilingOptions())

:mod:`.executor` runs the model's own layer list step by step over pieces with clip-wide GroupNorm
statistics; :mod:`.runner` plans piece sizes from the one memory estimate, falls back on
out-of-memory, reports progress and runs the official algorithm.
"""
from .runner import (DECODE, ENCODE, MODES, PROGRESS_UNITS, MemoryEstimate, Plan, TilingOptions, decode_latent,
                     encode_moments, estimate_memory, memory_request, plan_for)

__all__ = ["TilingOptions", "encode_moments", "decode_latent", "estimate_memory", "memory_request", "plan_for",
           "Plan", "MemoryEstimate", "ENCODE", "DECODE", "MODES", "PROGRESS_UNITS"]
