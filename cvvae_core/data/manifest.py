"""The one grammar for "these videos", shared by training and dataset encoding.

A folder (searched recursively for :data:`VIDEO_SUFFIXES`) or a manifest:

* ``.txt``: one path per line, optionally followed by start and end seconds (``a.mp4 1.5 9``);
  ``#`` starts a comment line;
* ``.csv``: a header with a ``path`` column and optionally ``start``/``end`` (seconds) or
  ``start_frame``/``end_frame``;
* ``.jsonl``: one object per line with the same keys.

Relative paths are relative to the manifest. A source's :attr:`Source.key` names it in logs and
in an encoded dataset's index: the path as the folder or manifest gives it, plus the range when
one is given.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingDataError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl")


@dataclass
class Source:
    """One video (or a part of it) named by a folder or manifest."""
    path: str
    name: str                          # as the folder/manifest names it
    start: float | None = None         # seconds
    end: float | None = None
    start_frame: int | None = None
    end_frame: int | None = None

    @property
    def key(self) -> str:
        """The name, with the range when one is given (one video may be listed with several)."""
        if self.start_frame is not None or self.end_frame is not None:
            return f"{self.name}[frames {self.start_frame or 0}-{'' if self.end_frame is None else self.end_frame}]"
        if self.start is not None or self.end is not None:
            return f"{self.name}[{self.start or 0:g}s-{'' if self.end is None else f'{self.end:g}s'}]"
        return self.name


def _number(value, what: str, where: str):
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TrainingDataError(f"{where}: {what} must be a number, got {value!r}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _folder(root: Path, what: str) -> list[Source]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not paths:
        raise TrainingDataError(f"{what}: folder {root} holds no video files ({', '.join(VIDEO_SUFFIXES)}); "
                                "put videos in it or give another folder or a manifest")
    return [Source(str(p), p.relative_to(root).as_posix()) for p in paths]


def _jsonl_rows(text: str, spec) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TrainingDataError(f"{spec} line {n}: not JSON ({e}); one object per line, "
                                        'e.g. {"path": "a.mp4", "start": 1.5, "end": 9}') from None
    return rows


def _csv_rows(text: str, spec) -> list[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    if "path" not in (reader.fieldnames or []):
        raise TrainingDataError(f"{spec}: a CSV manifest needs a header with a 'path' column "
                                "(optional: start, end, start_frame, end_frame)")
    return [(n, row) for n, row in enumerate(reader, 2)]


def _txt_rows(text: str, spec) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, *times = line.rsplit(maxsplit=2)
        if len(times) == 2 and all(_is_number(t) for t in times):   # "PATH START END"
            rows.append((n, {"path": head, "start": times[0], "end": times[1]}))
        else:                                                       # a path (spaces allowed)
            rows.append((n, {"path": line}))
    return rows


_ROWS = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}


def _source(row: dict, root: Path, where: str) -> Source:
    name = str(row.get("path") or "").strip()
    if not name:
        raise TrainingDataError(f"{where}: no path")
    path = Path(name) if Path(name).is_absolute() else root.parent / name
    frames = (_number(row.get(k), k, where) for k in ("start_frame", "end_frame"))
    return Source(str(path), name, _number(row.get("start"), "start", where), _number(row.get("end"), "end", where),
                  *(None if v is None else int(v) for v in frames))


def list_sources(spec, what: str = "data") -> tuple[list[Source], list[dict]]:
    """(sources, problems): the videos a folder or manifest names, sorted by key, each key once;
    ``problems`` are manifest lines that point nowhere (``path``, ``reason``: to be logged and
    skipped). ``what`` names the setting in messages (``data``, ``--videos``)."""
    root = Path(spec)
    if root.is_dir():
        return _folder(root, what), []
    if not root.is_file():
        raise TrainingDataError(f"{what}: {spec} does not exist; give a folder of videos or a manifest "
                                f"({', '.join(MANIFEST_SUFFIXES)}) listing them")
    suffix = root.suffix.lower()
    if suffix not in _ROWS:
        raise TrainingDataError(f"{what}: {spec} is neither a folder nor a manifest; a manifest ends in "
                                f"{', '.join(MANIFEST_SUFFIXES)} (for one video, put its folder or a one-line .txt)")
    sources, problems = {}, []
    for n, row in _ROWS[suffix](root.read_text(), spec):
        where = f"{spec} line {n}"
        src = _source(row, root, where)
        if not Path(src.path).is_file():
            problems.append({"path": src.name, "reason": f"{where}: {src.path} does not exist; fix or remove the line"})
            continue
        sources.setdefault(src.key, src)
    if not sources and not problems:
        raise TrainingDataError(f"{what}: manifest {spec} lists no videos; add one path per line")
    return sorted(sources.values(), key=lambda s: (s.name, s.start or 0, s.start_frame or 0)), problems
