"""``LatentDataset``: the latents written by ``encode-dataset``, as a map-style torch Dataset."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError


class LatentDataset(torch.utils.data.Dataset):
    """Item ``i`` is ``(latent, metadata)``: the ``i``-th clip of ``OUT/index.jsonl`` (sorted by
    source video and first frame) and its index line. The order and length depend only on the
    index, so every rank of a ``DistributedSampler`` sees the same list. Tensors are read lazily
    from the safetensors shards; up to ``open_shards`` shards stay open per process."""

    def __init__(self, out, open_shards: int = 8):
        self.out = Path(out)
        index = self.out / "index.jsonl"
        if not index.is_file():
            raise InputError(f"{index} does not exist: run `python -m cvvae_core encode-dataset ... --out {self.out}` "
                             f"to the end, or `python -m cvvae_core merge {self.out}` after a multi-rank run")
        self.records = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        self.open_shards = open_shards
        self._handles: OrderedDict | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _shard(self, name: str):
        if self._handles is None:
            self._handles = OrderedDict()
        if name in self._handles:
            self._handles.move_to_end(name)
        else:
            self._handles[name] = safe_open(str(self.out / name), framework="pt", device="cpu")
            if len(self._handles) > self.open_shards:
                self._handles.popitem(last=False)
        return self._handles[name]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        record = self.records[i]
        return self._shard(record["shard"]).get_tensor(record["key"]), record

    def __getstate__(self):
        # Open file handles do not cross into DataLoader workers; each worker opens its own.
        return {**self.__dict__, "_handles": None}
