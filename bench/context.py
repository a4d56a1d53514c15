"""What a section gets: arguments, a scratch directory, the dataset and command helpers."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import dataset as dataset_mod

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    """Shared by every section of one run.

    ``workdir`` is scratch space (removed at the end unless ``--keep``); ``repeats`` is how many
    times each timed measurement runs (sections report medians).
    """

    beliefs: int
    seed: int
    repeats: int
    workdir: Path
    keep: bool
    quick: bool = False  # --quick: sections that have a small variant run it
    src_root: Path | None = None  # an exported commit to run instead of the working tree
    #: vault sizes (GiB of unique data) of the ``lifetime`` section
    lifetime_sizes: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    _dataset: dataset_mod.Dataset | None = field(default=None, repr=False)

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def dataset(self) -> dataset_mod.Dataset:
        """The (cached) dumps for ``--beliefs``; built on first use."""
        if self._dataset is None:
            self._dataset = dataset_mod.ensure(self.beliefs, self.seed, self.log)
        return self._dataset

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for child processes: ours, the venv's bin first on PATH, plus extra."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if self.src_root is not None:
            # ahead of the venv's editable install, so the exported commit is what runs
            env["PYTHONPATH"] = str(self.src_root)
        env.update(extra)
        return env

    @property
    def vaultfs(self) -> list[str]:
        """How to start the vaultfs CLI (the venv's console script, as a user would)."""
        if self.src_root is not None:
            return [sys.executable, "-m", "cli.main"]
        script = Path(sys.executable).parent / "vaultfs"
        if script.exists():
            return [str(script)]
        return [sys.executable, "-m", "cli.main"]

    def export_ref(self, ref: str) -> str:
        """Run vaultfs from commit ``ref`` (``git archive`` into the scratch dir); returns the
        full commit id. Lets a run measure a fixed commit while others edit the tree."""
        import subprocess
        import tarfile

        commit = subprocess.run(
            ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if commit.returncode != 0:
            raise ValueError(f"--ref {ref}: not a commit of this repository")
        dest = self.scratch("src")
        archive = self.workdir / "src.tar"
        with open(archive, "wb") as f:
            subprocess.run(
                ["git", "archive", commit.stdout.strip()], cwd=REPO_ROOT, stdout=f, check=True
            )
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        archive.unlink()
        # byte-compiled as scripts/bootstrap leaves an install: with PYTHONDONTWRITEBYTECODE
        # set (CI, this shell) every command would otherwise compile ~1,000 code objects
        # first (~0.2 s a command, charged to vaultfs and not to the peers)
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", "vaultfs", "cli", "bench"],
            cwd=dest, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.src_root = dest
        return commit.stdout.strip()

    def scratch(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d
