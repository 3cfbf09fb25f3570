"""The tiling engine: exact (``seamless``) and ``official`` tiled encode/decode in bounded memory.

    from cvvae_core.tiling import TilingOptions
    z = vae.encode(video, tiling=TilingOptions())

:mod:`.runner` is the interface (options, the two passes, plans and memory requests);
:mod:`.planner` defines plans, their piece sizes, the one memory estimate and the cost model;
:mod:`.search` finds the fastest plan within the memory budgets; :mod:`.executor` runs the model's
own layer list step by step over pieces with clip-wide GroupNorm statistics; :mod:`.tiers` keeps
layer outputs on the device, in host memory or on disk and moves pieces between them;
:mod:`.official` is the official tiled algorithm; :mod:`.meter` reports progress.
"""
from .runner import (DECODE, ENCODE, MODES, PROGRESS_UNITS, MemoryEstimate, Plan, RunReport, TilingOptions,
                     decode_latent, encode_moments, estimate_memory, memory_request, plan_for)

__all__ = ["TilingOptions", "RunReport", "encode_moments", "decode_latent", "estimate_memory", "memory_request",
           "plan_for", "Plan", "MemoryEstimate", "ENCODE", "DECODE", "MODES", "PROGRESS_UNITS"]
