"""``LatentDataset``: the latents written by ``encode-dataset``, as a map-style torch Dataset; and
the check that a shard is the one its index lines name."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError, LatentShardError


def shard_problem(out: Path, name: str, records: list[dict]) -> str | None:
    """What is wrong with shard ``name`` for its index lines ``records`` (None: nothing). Reads the
    header only: the file is there, is readable safetensors, calls itself ``name`` (written into
    each shard's metadata, so a shard copied over another is seen) and holds each clip's tensor
    with the shape the index gives."""
    path = out / name
    if not path.is_file():
        return f"{path} is missing"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            claimed = (f.metadata() or {}).get("shard", name)
            keys = set(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        return f"{path} is truncated or damaged ({e})"
    if claimed != name:
        return f"{path} holds the shard {claimed}, not {name}: it was replaced"
    for r in records:
        if r["key"] not in keys or list(shapes[r["key"]]) != list(r["latent_shape"]):
            return f"{path} does not hold clip {r['clip']} as its index says: it was replaced"
    return None


def repair_hint(out: Path) -> str:
    return (f"run the same `cvvae encode-dataset ... --out {out}` command again: it re-encodes the clips of "
            "missing or damaged shards and keeps the rest")


class LatentDataset(torch.utils.data.Dataset):
    """Item ``i`` is ``(latent, metadata)``: the ``i``-th clip of ``OUT/index.jsonl`` (sorted by
    source video and first frame) and its index line. The order and length depend only on the
    index, so every rank of a ``DistributedSampler`` sees the same list. Tensors are read lazily
    from the safetensors shards; up to ``open_shards`` shards stay open per process. A shard that
    is missing, truncated or replaced raises :class:`~cvvae_core.errors.LatentShardError` naming
    it when first read."""

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
            problem = shard_problem(self.out, name, [r for r in self.records if r["shard"] == name])
            if problem:
                raise LatentShardError(f"{problem}; {repair_hint(self.out)}")
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
