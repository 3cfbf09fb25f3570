"""Argument types shared by the subcommands: bad values are refused while parsing, with what is
allowed, before any work.

Sizes and frame counts follow one rule on every command (:data:`SIZE_RULE`, shown in ``--help``):
a value given on the command line must be one the model takes, else it is refused naming the
nearest ones; what a video brings itself (its own size, a length short of ``--frames``) is cropped
down to the nearest valid values by the command, which says so.
"""
from __future__ import annotations

import argparse
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data.manifest import VIDEO_SUFFIXES
from ..errors import CheckpointCorruptError, CVVAEError, PickleRefusedError

#: CV-VAE's 8x spatial and 4x temporal compression as the command line states them. The commands
#: read the factors of the loaded model for their work; these are the values of every released
#: model, checked while parsing, before a model is loaded.
SIZE_STEP, FRAME_STEP = 8, 4

def size_rule(flags: str = "--size or --frames") -> str:
    """The one rule of sizes and frame counts, as the help of a command with ``flags`` states it."""
    return (f"Sizes are HxW in multiples of {SIZE_STEP} (e.g. 256x256), frame counts 1+{FRAME_STEP}k (1, 5, 9, 13, "
            f"17, ...). A {flags} that is not is refused, naming the nearest valid values. A video's own size "
            "and length (no --size or --frames given, or a video shorter than --frames) are cropped down to the "
            "nearest valid values, and the command prints what it cropped; encode-dataset instead skips a video "
            "shorter than --frames and lists it in errors.jsonl.")


SIZE_RULE = size_rule()


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block above it), and whose missing
    arguments are named in the command's own words."""

    #: The command line being parsed, for :meth:`error` (argparse does not pass it on).
    command_line: list[str] = []

    def error(self, message: str):
        required = "the following arguments are required: "
        if message.startswith(required):
            message = self._missing(message[len(required):].split(", "))
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _missing(self, names: list[str]) -> str:
        positionals = [a for a in self._actions if not a.option_strings]
        for a in positionals:
            if isinstance(a, argparse._SubParsersAction):
                return f"missing the command: one of {', '.join(a.choices)} (see {self.prog} --help)"
        signature = " ".join([a.metavar or a.dest.upper() for a in positionals] + [
            f"{a.option_strings[-1]} {a.metavar or a.dest.upper()}" for a in self._actions
            if a.option_strings and a.required])
        given = [t for t in self.command_line if not t.startswith("-")]
        first = given[1] if len(given) > 1 else None  # given[0] is the subcommand
        if positionals and positionals[0].dest == "checkpoint" and first and Path(first).suffix.lower() in VIDEO_SUFFIXES:
            return (f"missing the checkpoint: {first} is a video, and the checkpoint (a release folder, a .safetensors "
                    f"file or 'builtin') comes first: {self.prog} {signature}")
        words = [n if n.startswith("-") else f"the {n} argument" for n in names]
        listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
        return f"missing {listed}: {self.prog} {signature}"


def int_at_least(minimum: int, multiple_of: int = 1):
    """An argparse ``type``: an integer >= ``minimum`` that is a multiple of ``multiple_of``."""
    allowed = f"a multiple of {multiple_of}, at least {minimum}" if multiple_of > 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < minimum or value % multiple_of:
            below = value // multiple_of * multiple_of
            nearest = f"; nearest: {below} or {below + multiple_of}" if multiple_of > 1 and value >= minimum else ""
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}{nearest}")
        return value
    return parse


#: One side of a frame: a multiple of 8 pixels.
side = int_at_least(SIZE_STEP, multiple_of=SIZE_STEP)


def _nearest_sides(value: int) -> tuple[int, int]:
    """The valid sides nearest ``value``, below and above (the same twice when there is one)."""
    below = max(SIZE_STEP, value // SIZE_STEP * SIZE_STEP)
    return (below, below) if below == value or value < SIZE_STEP else (below, below + SIZE_STEP)


def size_hw(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``HxW`` with multiples of 8, e.g. 256x256 (a refusal names the nearest sizes)."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"must be HxW in multiples of {SIZE_STEP} (e.g. 256x256), got {text!r}")
    h, w = int(match.group(1)), int(match.group(2))
    if h % SIZE_STEP or w % SIZE_STEP or h < SIZE_STEP or w < SIZE_STEP:
        (h0, h1), (w0, w1) = _nearest_sides(h), _nearest_sides(w)
        nearest = f"{h0}x{w0}" if (h0, w0) == (h1, w1) else f"{h0}x{w0} or {h1}x{w1}"
        raise argparse.ArgumentTypeError(f"must be HxW in multiples of {SIZE_STEP}, got {h}x{w}; nearest: {nearest}")
    return h, w


def frame_count(minimum: int = 1):
    """An argparse ``type``: a frame count 1+4k of at least ``minimum`` (a refusal names the nearest)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be 1+{FRAME_STEP}k (1, 5, 9, 13, 17, ...), got {text!r}") from None
        if value < minimum or (value - 1) % FRAME_STEP:
            below = 1 + (value - 1) // FRAME_STEP * FRAME_STEP
            nearest = [minimum] if below < minimum else [below, below + FRAME_STEP]
            at_least = f" of at least {minimum}" if minimum > 1 else ""
            raise argparse.ArgumentTypeError(f"must be 1+{FRAME_STEP}k{at_least} (1, 5, 9, 13, 17, ...), got {value}; "
                                             f"nearest: {' or '.join(map(str, nearest))}")
        return value
    return parse


def legacy_size_pairs(argv: list[str]) -> list[str]:
    """``--size H W`` (the older spelling of compat and demo) as ``--size HxW``."""
    out, i = [], 0
    while i < len(argv):
        pair = argv[i + 1:i + 3]
        if argv[i] == "--size" and len(pair) == 2 and all(re.fullmatch(r"-?\d+", a) for a in pair):
            out += ["--size", f"{argv[i + 1]}x{argv[i + 2]}"]
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def existing_folder(text: str) -> str:
    """An argparse ``type``: a folder that exists."""
    if not Path(text).expanduser().is_dir():
        what = "is a file" if Path(text).expanduser().exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}; give an existing folder")
    return text


def device_name(text: str) -> str:
    """An argparse ``type``: 'auto' or a name torch.device understands (cpu, cuda, cuda:1, mps)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    return text


def describe_crop(adjustment, config) -> str | None:
    """The line a command prints when it cropped a video down to what the model (of
    :class:`~cvvae_core.spec.CVVAEConfig` ``config``) takes, from the
    :class:`~cvvae_core.model.frames.FrameAdjustment`; None when nothing was cropped."""
    parts = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in
             ((adjustment.trimmed_frames, "trailing frame"), (adjustment.trimmed_height, "bottom row"),
              (adjustment.trimmed_width, "right column")) if n]
    if not parts:
        return None
    return (f"cropped  {', '.join(parts)} (the model takes 1+{config.time_compression}k frames and sizes in "
            f"multiples of {config.spatial_compression})")


@contextmanager
def argument_errors(name: str, value: str, kinds=CVVAEError, *, pickle_flag: bool = False, role: str = ""):
    """Errors of ``kinds`` raised while using the value of argument ``name`` say which argument it
    was, in the command line's words: ``error: argument NAME: ...``, like argparse's own. A
    checkpoint argument that names a video says where the video goes (``role``, e.g. "the first
    argument is the checkpoint"); a pickle file is pointed at ``--allow-pickle`` where the command
    has that flag (``pickle_flag``)."""
    try:
        yield
    except PickleRefusedError:
        fix = ("use the .safetensors release, or pass --allow-pickle to read it with torch.load(weights_only=True)"
               if pickle_flag else "this command reads .safetensors only: use the .safetensors release")
        raise PickleRefusedError(f"argument {name}: {value} is a pickle-based checkpoint, which can run code when "
                                 f"loaded; {fix}") from None
    except CheckpointCorruptError as e:
        if Path(value).suffix.lower() in VIDEO_SUFFIXES:
            raise CheckpointCorruptError(f"argument {name}: {value} is a video, not a checkpoint (a release folder, a "
                                         f".safetensors file or 'builtin'); {role}") from None
        raise CheckpointCorruptError(f"argument {name}: {e}") from None
    except kinds as e:
        raise type(e)(f"argument {name}: {e}") from None
