"""The `vaultfs` console script: start unlocking the keyfile, then import and run the CLI."""

from __future__ import annotations

import sys


def main() -> None:
    from cli import early

    early.start(sys.argv)
    from cli.main import main as run

    run()
