"""Argument types shared by the subcommands: bad values are refused while parsing, with what is
allowed, before any work."""
from __future__ import annotations

import argparse

import torch


def int_at_least(minimum: int, multiple_of: int = 1):
    """An argparse ``type``: an integer >= ``minimum`` that is a multiple of ``multiple_of``."""
    allowed = f"a multiple of {multiple_of}, at least {minimum}" if multiple_of > 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < minimum or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value
    return parse


def device_name(text: str) -> str:
    """An argparse ``type``: 'auto' or a name torch.device understands (cpu, cuda, cuda:1, mps)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    return text
