"""README and the parser agree: every command README shows exists, every command exists in
README's command list, and every flag README gives a command is one that command takes."""
import argparse
import re
import shlex
from pathlib import Path

from cvvae_core.cli.main import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def command_lines() -> list[list[str]]:
    """The words after ``cvvae`` / ``-m cvvae_core`` of every command line in README's code blocks."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#")[0]
            match = re.search(r"(?:^|\s|/)(?:cvvae|-m cvvae_core)\s+(.*)", line)
            if match and match.group(1).strip():
                lines.append(shlex.split(match.group(1)))
    return lines


def section(title: str) -> str:
    return README.split(f"## {title}\n")[1].split("\n## ")[0]


def test_every_command_in_readme_exists_with_the_flags_it_shows():
    commands, root = subparsers(), flags(build_parser())
    shown = command_lines()
    assert len(shown) >= 10
    for words in shown:
        if words[0].startswith("-"):
            assert words[0] in root, words
            continue
        assert words[0] in commands, f"README shows `cvvae {' '.join(words)}`, but there is no {words[0]} command"
        unknown = {w.split("=")[0] for w in words[1:] if w.startswith("--")} - flags(commands[words[0]])
        assert not unknown, f"README gives `cvvae {words[0]}` {sorted(unknown)}, which it does not take"


def test_every_command_is_in_readmes_command_list():
    listed = {words[0] for block in re.findall(r"```bash\n(.*?)```", section("Command line"), re.S)
              for words in [shlex.split(line.split("#")[0])[1:] for line in block.splitlines()
                            if line.startswith("cvvae ")] if words}
    assert set(subparsers()) <= listed, f"missing from README's command list: {sorted(set(subparsers()) - listed)}"


def test_every_flag_readme_names_in_its_text_exists():
    every = set().union(*(flags(p) for p in subparsers().values()))
    for title in ("Command line", "Training on your own videos", "Encoding a video dataset"):
        named = set(re.findall(r"`[^`]*?(--[a-z][a-z0-9-]*)", section(title)))
        assert named <= every, f"README's {title} names {sorted(named - every)}, which no command takes"
