"""Advice points at commands that exist: every `vaultfs CMD [SUB] --opt` quoted in a string of
vaultfs/ or cli/ (error messages, warnings, help) names a command of the typer app
(cli/main.py) and options that command takes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.main import get_command

import cli.main
from cli.common import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
#: `vaultfs …` between backquotes, as messages and docstrings quote a command to run
QUOTED = re.compile(r"`(vaultfs [^`]+)`")
#: a word that names a command or a choice of them (add|remove, add/remove)
WORDS = re.compile(r"^[a-z][a-z-]*(?:[|/][a-z][a-z-]*)*$")
APP = get_command(cli.main.app)
for _name in COMMANDS:  # the app imports a command's module when it is first looked up
    APP.get_command(None, _name)


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in the file, f-strings' literal parts included."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def _suggestions() -> list[tuple[str, str]]:
    """(where, quoted command) of every suggestion in the source."""
    out = []
    for pkg in ("vaultfs", "cli"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, text in _strings(path):
                for m in QUOTED.finditer(" ".join(text.split())):
                    out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return out


SUGGESTIONS = _suggestions()


def _problems(command: str) -> list[str]:
    """Why ``command`` (``vaultfs …``) does not name what the app has; [] when it does."""
    words = command.split()[1:]
    cmds = [APP]
    path = "vaultfs"
    while words and all(hasattr(c, "commands") for c in cmds) and WORDS.match(words[0]):
        names = re.split(r"[|/]", words.pop(0))
        missing = [n for n in names if not any(n in c.commands for c in cmds)]
        if missing:
            return [f"`{path} {'|'.join(missing)}` is no command"]
        cmds = [c.commands[n] for c in cmds for n in names if n in c.commands]
        path += " " + "|".join(names)
    bad = []
    for opt in (w.split("=")[0] for w in words if w.startswith("--") and w != "--help"):
        for c in cmds:
            if not any(opt in p.opts or opt in p.secondary_opts for p in c.params):
                bad.append(f"`{path}` has no option {opt}")
    return bad


def test_the_source_suggests_commands() -> None:
    """The extraction itself finds what it must: advice of verify, repair and the home."""
    found = {cmd for _where, cmd in SUGGESTIONS}
    assert {"vaultfs repair", "vaultfs verify"} <= found
    assert any(cmd.startswith("vaultfs home rebuild --from") for cmd in found)
    assert _problems("vaultfs home rebuild --from R") == []
    assert _problems("vaultfs restore --no-such-option") != []
    assert _problems("vaultfs remote add|rename") != []
    assert _problems("vaultfs fsck") != []


@pytest.mark.parametrize(("where", "command"), SUGGESTIONS, ids=[w for w, _c in SUGGESTIONS])
def test_every_suggested_command_exists(where: str, command: str) -> None:
    assert _problems(command) == [], f"{where}: {command}"
