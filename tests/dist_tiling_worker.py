"""One rank of tests/test_distributed_tiling.py: ``python dist_tiling_worker.py OUT CASES_JSON``
(RANK/WORLD_SIZE/MASTER_* set as torchrun does). Rank 0 saves every case's result to OUT."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from cvvae_core.tiling import executor, runner as tiling  # noqa: E402
from cvvae_core.errors import DistributedRunError  # noqa: E402
from test_distributed_tiling import case_input, small_model  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="env://")
model = small_model()
results, pieces = {}, {}
real_run = executor.ConvStep.run


def counted_run(step, read, box):
    pieces[key] = pieces.get(key, 0) + 1
    return real_run(step, read, box)


executor.ConvStep.run = counted_run
try:
    for case in json.loads(sys.argv[2]):
        x = case_input(case)
        opts = tiling.TilingOptions(tile_size=case["tile"], chunk_frames=case["chunk"], distributed=True,
                                    memory_budget=case.get("budget"))
        run = tiling.decode_latent if case["what"] == "decode" else tiling.encode_moments
        key = json.dumps(case)
        results[key] = run(model, x, opts)
except DistributedRunError as err:
    print(f"rank {dist.get_rank()}: DistributedRunError: {err}", flush=True)
    sys.stdout.flush()
    os._exit(3)  # no teardown: gloo can abort while the other rank exits (SIGABRT, pytorch#179291)
print("pieces " + json.dumps(pieces), flush=True)
if dist.get_rank() == 0:
    torch.save(results, sys.argv[1])
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter finalization: gloo (torch 2.13) can abort there (SIGABRT, pytorch#179291)
