"""Hostile remotes: one remote of a 3-of-5 vault misbehaves on purpose, well within n − k.

Each case gives a restore the bad remote and the four honest ones, on plain local directories
and on real `rclone serve s3` buckets, and requires: exit 0, the restored tree identical to
the source, the bad remote named in the restore's report (where it served or listed
something the restore looked at), and the restore's peak memory within
:data:`RSS_BOUND` (the largest resident set of the restore process and of every process it
waited for: decoders, rclone). Nothing is asserted about time; the suite prints peak RSS and
time of every case against the honest baseline (``pytest -s``) for the closing note.

The cases (docs/threat-model.md, "Hostile remotes"):

* ``giant``: every shard object of the bad remote (data/ and meta/) swapped for a 200 GB
  sparse file. Never read: refused by its listed size (and by ``fstat`` when read in place).
* ``flood``: 40 junk "manifests" of 50 MiB, named above the real one. Refused unread by their
  listed size; the real manifest below them is still found.
* ``junk``: 4 GiB of junk under meta/ and 1 GiB under data/ (sparse). No verified manifest or
  index names it: meta/ is never read ahead, data/ is read ahead within the budget only.
* ``lying-listing`` (a test-local wrapper around the remote): the listing gives every data
  and meta object another size than the object has; then a listing that gives the expected
  sizes while the objects are 200 GB. The first is refused by the listing, the second by the
  capped reads (``fstat`` in place, rclone's cut-off for downloads, ``--count`` for reads).
* ``long-ranges`` (wrapper): every ranged read returns more bytes than asked and downloads
  fail, so each object is read with a range. The answers are refused by length.

Beyond n − k (``test_beyond_n_minus_k_is_a_clear_error``): the same bad remote with only two
honest ones is a clear error with exit code 11, never a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import S3Server, init_local_vault, run_cli, tree_digest, vaultfs_env

from bench.harness import launch_report, launched
from vaultfs.remotes import Remote
from vaultfs.restore import read_object

ROOT = Path(__file__).resolve().parent.parent
#: Peak resident memory a restore may use, whatever one bad remote does (the honest baseline
#: of this small vault is well under half of it).
RSS_BOUND = 400 << 20
GIANT = 200 * 10**9
HONEST = ("honest1", "honest2", "honest3", "honest4")
FIGURES: list[tuple[str, str, float, int]] = []


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float
    peak_rss: int


def measured(cmd: list[str], env: dict[str, str], timeout: float = 300) -> Run:
    """Run ``cmd``; its exit code, output, wall time and peak RSS (``ru_maxrss`` from
    ``wait4``: the largest of the process and every descendant it waited for), taken by
    ``bench/launch.py`` so this pytest process's own size is not folded in."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        report = Path(tmp) / "rusage"
        t0 = time.perf_counter()
        proc = subprocess.Popen(launched(cmd, report), stdout=out, stderr=err, env=env, cwd=ROOT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the command dies with its launcher
            proc.wait()
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            launch_report(report)[0],
        )


#: The restore with a wrapped bad remote, run in a child process like the command line
#: would be: argv[1] is a JSON job (specs, the bad one's lies, keyfile, target).
CHILD = r"""
import json, sys
from pathlib import Path
from vaultfs.backends import Wrapper, open_backend
from vaultfs.errors import RemoteError
from vaultfs.keys import read_keyfile
from vaultfs.restore import open_remote_index, restore_files

job = json.loads(sys.argv[1])


class Lying(Wrapper):
    '''A remote that lies: about sizes in its listing ("listing": "other" gives every
    data/meta object one byte more than it has, "expected" gives the sizes of the honest
    objects of the same names), or about ranges ("long_ranges": every read returns 4 KiB more
    than asked, and downloads fail so that every object is read with a range).'''

    def __init__(self, inner, listing=None, sizes=None, long_ranges=False):
        super().__init__(inner)
        self.listing, self.sizes, self.long_ranges = listing, sizes or {}, long_ranges

    @property
    def local_dir(self):
        return None if self.long_ranges else self.inner.local_dir

    def list_tree(self, subs=("data", "meta", "manifests")):
        tree = self.inner.list_tree(subs)
        for sub in ("data", "meta"):
            for name, size in tree.get(sub, {}).items():
                if self.listing == "other":
                    tree[sub][name] = size + 1
                elif self.listing == "expected":
                    tree[sub][name] = self.sizes.get(name, size)
        return tree

    def get(self, sub, names, local_dir, max_bytes=0):
        if self.long_ranges:
            raise RemoteError(f"{self.label}: download failed (injected)")
        self.inner.get(sub, names, local_dir, max_bytes)

    def cat(self, sub, name, offset=0, count=-1):
        data = self.inner.cat(sub, name, offset, count)
        return data + b"\0" * 4096 if self.long_ranges else data


keys = read_keyfile(Path(job["keyfile"]), job["passphrase"])
remotes = [open_backend(s) for s in job["honest"]]
remotes.insert(0, open_backend(job["bad"], wrap=lambda b: Lying(b, **job["lies"])))
db, src, m, warnings = open_remote_index(keys, remotes, Path(job["work"]))
uid, files, size, w2 = restore_files(keys, db, src, Path(job["to"]))
db.close()
print(json.dumps({
    "warnings": warnings + w2,
    "remotes": [{"remote": r.label, "rejected": r.rejected} for r in src.reports.values()],
}))
"""


class QuickS3(S3Server):
    """`rclone serve s3` with ETags off and no directory cache. By default it MD5-hashes
    every object it lists (14 s for a 2 GB sparse file, hours for the 200 GB ones here), which
    no real provider's listing does, and it caches listings for minutes, so the buckets each
    case damages after the first restore would stay invisible."""

    def _serve_args(self) -> list[str]:
        return [*super()._serve_args(), "--etag-hash=", "--dir-cache-time=0s"]


class Vault:
    """One 3-of-5 vault, its source tree and its five remotes as plain directories; the
    same five served as S3 buckets by one `rclone serve s3`. Honest remotes are shared by
    every case (a restore never writes to a remote); each case damages a fresh copy of the
    fifth remote."""

    def __init__(self, tmp: Path, s3: S3Server) -> None:
        self.tmp, self.s3 = tmp, s3
        self.home = tmp / "home"
        self.src = tmp / "src"
        (self.src / "docs").mkdir(parents=True)
        rnd = __import__("random").Random(14)
        (self.src / "big.bin").write_bytes(rnd.randbytes(5_000_000))
        for i in range(20):
            (self.src / "docs" / f"n{i}.txt").write_text(f"note {i}\n" * (100 + 50 * i))
        self.dirs = {name: tmp / "remotes" / name for name in (*HONEST, "pristine")}
        args = ["init", "-k", "3", "-n", "5", "--segment-mib", "1"]
        for d in self.dirs.values():
            args += ["--remote", str(d)]
        run_cli(*args, home=self.home)
        run_cli("backup", str(self.src), home=self.home)
        for name, d in self.dirs.items():
            shutil.copytree(d, s3.root / name)
        self.digest = tree_digest(self.src)
        self.runs = 0

    def spec(self, name: str, kind: str) -> str:
        """The remote ``name`` as a directory (kind "local") or an S3 bucket ("s3")."""
        return str(self.tmp / "remotes" / name) if kind == "local" else self.s3.remote(name)

    def bad_copy(self, case: str, kind: str) -> tuple[Path, str]:
        """A fresh copy of the fifth remote for one case: (its directory, its spec)."""
        name = f"bad-{case}-{kind}"
        d = (self.tmp / "remotes" if kind == "local" else self.s3.root) / name
        shutil.copytree(self.dirs["pristine"], d)
        return d, self.spec(name, kind)

    def restore(self, bad: str, kind: str, honest: tuple[str, ...] = HONEST, lies=None) -> Run:
        """Restore the latest snapshot on an empty machine from ``bad`` and the ``honest``
        remotes: with the command line, or (with ``lies``) through the library in a child
        process with the bad remote wrapped in a lying one. Returns the measured run; its
        ``out`` is the JSON report."""
        self.runs += 1
        work = self.tmp / f"run{self.runs}"
        to = work / "out"
        env = vaultfs_env(work / "home")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if lies is None:
            cmd = [sys.executable, "-m", "cli.main", "restore", "--json", "--to", str(to)]
            cmd += ["--keyfile", str(self.home / "key.json"), "--from", bad]
            for h in honest:
                cmd += ["--from", self.spec(h, kind)]
        else:
            job = {
                "bad": bad,
                "honest": [self.spec(h, kind) for h in honest],
                "lies": lies,
                "keyfile": str(self.home / "key.json"),
                "passphrase": env["VAULTFS_PASSPHRASE"],
                "work": str(work / "w"),
                "to": str(to),
            }
            cmd = [sys.executable, "-c", CHILD, json.dumps(job)]
        run = measured(cmd, env)
        if run.code == 0:
            assert tree_digest(to / self.src.name) == self.digest
            shutil.rmtree(to)
        return run

    def sizes(self) -> dict[str, int]:
        """{object name: size} of the honest objects of the fifth remote."""
        return {
            p.name: p.stat().st_size
            for sub in ("data", "meta")
            for p in (self.dirs["pristine"] / sub).iterdir()
        }


@pytest.fixture(scope="module")
def vault(tmp_path_factory, rclone_bin) -> Vault:
    tmp = tmp_path_factory.mktemp("hostile")
    s3 = QuickS3(tmp / "s3", rclone_bin)
    try:
        yield Vault(tmp, s3)
    finally:
        s3.stop()
        if FIGURES:
            print("\nrestore under one hostile remote (3-of-5, 4 honest remotes given):")
            print(f"{'case':<16}{'remotes':<8}{'time s':>8}{'peak RSS MB':>13}")
            for case, kind, secs, rss in FIGURES:
                print(f"{case:<16}{kind:<8}{secs:>8.2f}{rss / 1e6:>13.0f}")


def damage_giant(d: Path) -> None:
    for sub in ("data", "meta"):
        for p in (d / sub).iterdir():
            os.truncate(p, GIANT)  # sparse: nothing is written


def damage_flood(d: Path) -> None:
    newest = max(int(p.name.split("-")[0]) for p in (d / "manifests").iterdir())
    for seq in range(newest + 1, newest + 41):
        p = d / "manifests" / f"{seq:016d}-{secrets.token_hex(8)}"
        p.touch()
        os.truncate(p, 50 << 20)


def damage_junk(d: Path) -> None:
    for sub, count, size in (("meta", 4, 1 << 30), ("data", 16, 64 << 20)):
        for _ in range(count):
            p = d / sub / secrets.token_hex(16)
            p.touch()
            os.truncate(p, size)


DAMAGE = {"giant": damage_giant, "flood": damage_flood, "junk": damage_junk}


def named(run: Run, label: str) -> bool:
    """Whether the restore's JSON report names the remote ``label`` as having served,
    listed or signed something wrong."""
    rep = json.loads(run.out)
    mine = [r for r in rep["remotes"] if r["remote"] == label]
    return any(r["rejected"] for r in mine) or any(w.startswith(label) for w in rep["warnings"])


def check(vault: Vault, case: str, kind: str, run: Run, label: str, must_name: bool) -> None:
    assert run.code == 0, run.err[-3000:]
    assert "Traceback" not in run.err
    assert run.peak_rss <= RSS_BOUND, f"peak RSS {run.peak_rss / 1e6:.0f} MB"
    if must_name:
        assert named(run, label), run.out
    FIGURES.append((case, kind, run.seconds, run.peak_rss))


KINDS = ["local", pytest.param("s3", marks=pytest.mark.network)]


@pytest.mark.parametrize("kind", KINDS)
def test_honest_baseline(vault: Vault, kind: str) -> None:
    run = vault.restore(vault.spec("pristine", kind), kind)
    check(vault, "honest", kind, run, "", must_name=False)
    assert not json.loads(run.out)["warnings"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["giant", "flood", "junk"])
def test_a_bad_remote_costs_only_its_own_objects(vault: Vault, case: str, kind: str) -> None:
    d, spec = vault.bad_copy(case, kind)
    DAMAGE[case](d)
    run = vault.restore(spec, kind)
    # junk no verified manifest or index names is never looked at: nothing to name
    check(vault, case, kind, run, Remote(spec).label, must_name=case != "junk")


@pytest.mark.parametrize("kind", KINDS)
def test_a_listing_that_lies_about_sizes(vault: Vault, kind: str) -> None:
    """Listed sizes that disagree with the signed ones: refused by the listing alone."""
    d, spec = vault.bad_copy("listing", kind)
    run = vault.restore(spec, kind, lies={"listing": "other"})
    check(vault, "lying-listing", kind, run, Remote(spec).label, must_name=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_listing_that_hides_giant_objects(vault: Vault, kind: str) -> None:
    """Listed at the expected sizes, the objects are 200 GB: the reads are capped."""
    sizes = vault.sizes()
    d, spec = vault.bad_copy("hidden", kind)
    damage_giant(d)
    run = vault.restore(spec, kind, lies={"listing": "expected", "sizes": sizes})
    check(vault, "hidden-giant", kind, run, Remote(spec).label, must_name=True)


@pytest.mark.parametrize("kind", KINDS)
def test_range_reads_that_return_more_than_asked(vault: Vault, kind: str) -> None:
    d, spec = vault.bad_copy("ranges", kind)
    run = vault.restore(spec, kind, lies={"long_ranges": True})
    check(vault, "long-ranges", kind, run, Remote(spec).label, must_name=True)


def test_beyond_n_minus_k_is_a_clear_error(vault: Vault) -> None:
    """The giant-shard remote with only two honest ones: fewer than k intact shards per
    segment, a clear error and exit code 11, no traceback, memory still bounded."""
    d, spec = vault.bad_copy("beyond", "local")
    damage_giant(d)
    run = vault.restore(spec, "local", honest=HONEST[:2])
    assert run.code == 11, run.err[-3000:]
    assert "Traceback" not in run.err and "error:" in run.err
    assert run.peak_rss <= RSS_BOUND


def test_a_shard_file_is_read_to_its_expected_size_only(tmp_path: Path) -> None:
    """The one reader of staged and in-place shard files: a FIFO does not block it, a 200 GB
    file costs one fstat, a right-sized one comes back whole."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_object(fifo, 100) == "is not a regular file"
    big = tmp_path / "big"
    big.touch()
    os.truncate(big, GIANT)
    assert read_object(big, 100) == "is 200,000,000,000 bytes, the signed metadata says 100"
    ok = tmp_path / "ok"
    ok.write_bytes(bytes(range(100)))
    head, frag = read_object(ok, 100)
    assert head + frag == bytes(range(100))
    assert "could not be read" in read_object(tmp_path / "gone", 100)


def test_verify_names_a_manifest_flood_without_reading_it(tmp_path: Path) -> None:
    """`vaultfs verify --read-all` on a remote with 40 junk "manifests" of 50 MiB above the
    real one: each is named, none is read (the audit's bytes stay those of the real objects),
    and the real manifest is still found."""
    home, remotes = init_local_vault(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(os.urandom(300_000))
    run_cli("backup", str(tmp_path / "src"), home=home)
    damage_flood(remotes[0])
    proc = run_cli("verify", "--read-all", "--json", home=home, check=None)
    assert proc.returncode == 12 and "Traceback" not in proc.stderr.decode()
    rep = next(r for r in json.loads(proc.stdout)["remotes"] if r["remote"] == str(remotes[0]))
    junk = [f for f in rep["foreign"] if f.startswith("manifests/")]
    assert len(junk) == 40
    assert all("not read" in rep["details"][f] for f in junk)
    assert rep["manifest_seq"] == 1 and not rep["stale_manifest"]
    assert rep["bytes_read"] < 10 << 20
