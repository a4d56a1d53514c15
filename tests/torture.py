"""Crash torture: kill -9 a vaultfs command at a random point, then check that the vault
recovers by itself and lost nothing it had committed (docs/operations.md, "Crash torture").

One *trial* of an operation:

1. copy the operation's prepared world (a vault home, its three local remotes, the source
   trees) into place — always the same path, so the remote specs in the index stay right;
2. run the operation's command in its own session and SIGKILL the whole process group
   (rclone included) after a random delay within the command's measured duration;
3. recover as a user would: ``vaultfs flush`` (which finishes an interrupted commit), then the
   operation's *finish* command if it has one (a repair, prune or re-encryption is run again
   and resumes), then ``vaultfs flush`` again;
4. check: ``vaultfs verify --read-all`` exits 0, every snapshot the world had committed before
   the kill is still listed, and every listed snapshot restores to exactly one of the source
   trees. *Bytes lost* are the bytes of committed snapshots that are missing or wrong. The
   manifest chain on the remotes is linear (one manifest per sequence number, each naming the
   one before it), and a restore from the remotes alone reports no fork and uses the home's
   newest manifest.

scripts/torture runs many trials per operation and prints the table; tests/test_torture.py
runs a handful.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "torture chamber passphrase"
REMOTES = ("r0", "r1", "r2")


def cli(world: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``vaultfs ARGS`` against the world's vault, to the end."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        timeout=timeout,
        env=_env(world),
        cwd=ROOT,
    )


def _env(world: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VAULTFS_HOME=str(world / "home"),
        VAULTFS_PASSPHRASE=PASSPHRASE,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _ok(world: Path, *args: str) -> str:
    proc = cli(world, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"vaultfs {' '.join(args)} -> {proc.returncode}: {proc.stderr[-600:]!r}")
    return proc.stdout.decode()


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every regular file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            out[str(p.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def _make_tree(root: Path, files: int, size: int, rng: random.Random) -> None:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i:03d}.bin").write_bytes(rng.randbytes(size))


def snapshots(world: Path) -> list[dict]:
    return json.loads(_ok(world, "snapshots", "--json"))


# -- operations ---------------------------------------------------------------------------
@dataclass
class Operation:
    """A command to kill: ``prepare(world)`` builds the world once; ``command`` is what is
    killed; ``finish`` (if any) is what the user runs again after the kill."""

    name: str
    prepare: Callable[[Path], None]
    command: tuple[str, ...]
    finish: tuple[str, ...] | None = None
    #: "command": kill the command; "mount": kill the mount daemon under a writer that
    #: fsyncs files and takes snapshots (:meth:`Chamber.mount_trial`; ``command`` unused)
    kind: str = "command"


def _init(world: Path, rng: random.Random) -> None:
    for r in REMOTES:
        (world / r).mkdir(parents=True)
    remotes = [a for r in REMOTES for a in ("--remote", str(world / r))]
    _ok(world, "init", "-k", "2", "-n", "3", "--segment-mib", "1", *remotes)
    _make_tree(world / "src1", 3, 200_000, rng)
    _make_tree(world / "src2", 10, 200_000, rng)
    _ok(world, "backup", str(world / "src1"))


def _prep_backup(world: Path) -> None:
    _init(world, random.Random(1))


def _prep_prune(world: Path) -> None:
    _init(world, random.Random(2))
    _ok(world, "backup", str(world / "src2"))
    first = snapshots(world)[0]["id"]
    _ok(world, "snapshot", "delete", first)


def _prep_repair(world: Path) -> None:
    _init(world, random.Random(3))
    _ok(world, "backup", str(world / "src2"))
    shutil.rmtree(world / "r0" / "data")  # a remote lost its data shards


def _prep_plain(world: Path) -> None:
    _init(world, random.Random(4))
    _ok(world, "backup", str(world / "src2"))


def _prep_replace(world: Path) -> None:
    _prep_plain(world)
    (world / "r3").mkdir()


def _prep_mount(world: Path) -> None:
    _init(world, random.Random(5))
    (world / "mnt").mkdir()


# -- the mount under a writer -------------------------------------------------------------
#: files the writer writes per run (each fsync'd), and a snapshot after every this many
MOUNT_FILES = 36
SNAPSHOT_EVERY = 6


@dataclass
class _Writes:
    """What a mount writer made durable before the daemon died: {path: (size, sha256)} of
    every file whose fsync returned, and, per snapshot whose command exited 0, the tree it
    was taken of."""

    durable: dict[str, tuple[int, str]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    #: the tree each snapshot was asked for, committed or not (a snapshot cut by the kill
    #: may still have been committed, and must then hold exactly this)
    asked: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)


def _write_into(world: Path, rng: random.Random, stop: Callable[[], bool]) -> _Writes:
    """Write MOUNT_FILES files into the mounted live tree (each fsync'd), with a `vaultfs
    snapshot` after every SNAPSHOT_EVERY, until done or the mount fails under it."""
    mp = world / "mnt"
    out = _Writes()
    try:
        (mp / "w").mkdir(exist_ok=True)
        for i in range(MOUNT_FILES):
            if stop():
                break
            data = rng.randbytes(rng.choice((700, 40_000, 300_000)))
            rel = f"w/f{i:03d}.bin"
            fd = os.open(mp / rel, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            out.durable[rel] = (len(data), hashlib.sha256(data).hexdigest())
            if (i + 1) % SNAPSHOT_EVERY == 0:
                name = f"t{i + 1:03d}"
                out.asked[name] = dict(out.durable)
                if cli(world, "snapshot", "--name", name, timeout=120).returncode == 0:
                    out.snapshots[name] = out.asked[name]
    except OSError:  # the daemon died under the writer
        pass
    return out


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("backup", _prep_backup, ("backup", "{world}/src2")),
        Operation("prune", _prep_prune, ("prune",), finish=("prune",)),
        Operation("repair", _prep_repair, ("repair",), finish=("repair",)),
        Operation(
            "reencrypt",
            _prep_plain,
            ("reencrypt", "--suite", "mlkem1024"),
            finish=("reencrypt", "--suite", "mlkem1024"),
        ),
        Operation("keys rotate", _prep_plain, ("keys", "rotate")),
        Operation(
            "remote replace",
            _prep_replace,
            ("remote", "replace", "{world}/r0", "{world}/r3"),
            finish=("repair",),
        ),
        Operation("mount writes", _prep_mount, (), kind="mount"),
    )
}


# -- trials -----------------------------------------------------------------------------------
@dataclass
class Result:
    """The outcome of the trials of one operation."""

    operation: str
    trials: int = 0
    recovered: int = 0
    bytes_lost: int = 0
    failures: list[str] = field(default_factory=list)


class Chamber:
    """Runs trials of the operations under ``base`` (a scratch directory it owns)."""

    def __init__(self, base: Path, seed: int | None = None) -> None:
        self.base = base
        self.world = base / "world"
        self.rng = random.Random(seed)
        self.templates: dict[str, tuple[Path, float, list[dict]]] = {}

    def _args(self, args: tuple[str, ...]) -> list[str]:
        return [a.replace("{world}", str(self.world)) for a in args]

    def _template(self, op: Operation) -> tuple[Path, float, list[dict]]:
        """The prepared world of ``op``, the command's uncut duration, and the snapshots
        committed before it (built once, then copied for every trial)."""
        if op.name in self.templates:
            return self.templates[op.name]
        shutil.rmtree(self.world, ignore_errors=True)
        op.prepare(self.world)
        before = snapshots(self.world)
        tpl = self.base / ("tpl-" + op.name.replace(" ", "-"))
        shutil.rmtree(tpl, ignore_errors=True)
        shutil.copytree(self.world, tpl, symlinks=True)
        t0 = time.monotonic()
        if op.kind == "mount":
            pid = self._mount()
            _write_into(self.world, random.Random(0), lambda: False)
            took = time.monotonic() - t0
            _ok(self.world, "umount", str(self.world / "mnt"))
            _wait_gone(pid)
        else:
            _ok(self.world, *self._args(op.command))
            took = time.monotonic() - t0
        self.templates[op.name] = (tpl, took, before)
        return self.templates[op.name]

    def _mount(self) -> int:
        """Mount the world's live tree; the daemon's pid."""
        out = _ok(self.world, "mount", str(self.world / "mnt"))
        return int(out.split("daemon pid ")[1].split(";")[0])

    def mount_trial(self, op: Operation) -> tuple[bool, int, str]:
        """Kill -9 the mount daemon while a writer fsyncs files into the live tree and takes
        snapshots; then recover as a user would (``vaultfs umount`` cleans up the dead mount,
        ``vaultfs mount`` recovers the cache) and check that every file whose fsync returned
        reads back exactly, every snapshot whose command succeeded is listed and restores to
        the tree it was taken of, and, after ``umount``, ``verify --read-all`` is clean and
        the manifest chain linear."""
        tpl, took, before = self._template(op)
        shutil.rmtree(self.world, ignore_errors=True)
        shutil.copytree(tpl, self.world, symlinks=True)
        try:
            return self._mount_trial(took, before)
        finally:  # whatever failed, leave no mount and no daemon behind
            mp = self.world / "mnt"
            if os.path.ismount(mp) or not os.access(mp, os.F_OK):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            for p in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    if str(mp).encode() in (p / "cmdline").read_bytes():
                        os.kill(int(p.name), signal.SIGKILL)

    def _mount_trial(self, took: float, before: list[dict]) -> tuple[bool, int, str]:
        pid = self._mount()
        rng = random.Random(self.rng.random())
        killed = threading.Event()

        def killer() -> None:
            if not killed.wait(self.rng.uniform(0, took * 1.1)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                killed.set()

        t = threading.Thread(target=killer)
        t.start()
        writes = _write_into(self.world, rng, killed.is_set)
        if not killed.is_set():  # the writer finished first: kill now
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        t.join()
        _wait_gone(pid)
        problems, lost = [], 0
        mp = self.world / "mnt"
        steps = [("umount", str(mp)), ("mount", str(mp))]
        for step in steps:
            res = cli(self.world, *step)
            if res.returncode != 0:
                problems.append(
                    f"`{' '.join(step)}` exited {res.returncode}: {res.stderr.decode(errors='replace')[-300:]}"
                )
        if os.path.ismount(mp):
            got = tree_digest(mp / "w") if (mp / "w").is_dir() else {}
            for rel, want in writes.durable.items():
                if got.get(rel.removeprefix("w/")) != want:
                    lost += want[0]
                    problems.append(f"fsync'd {rel} is missing or wrong after the remount")
            res = cli(self.world, "umount", str(mp))
            if res.returncode != 0:
                problems.append(
                    f"`umount` exited {res.returncode}: {res.stderr.decode(errors='replace')[-300:]}"
                )
        problems += _verify(self.world)
        now = {s.get("name"): s for s in snapshots(self.world)}
        for s in before:
            if s["id"] not in {x["id"] for x in now.values()}:
                lost += s["bytes"]
                problems.append(f"committed snapshot {s['id']} is gone")
        for name, tree in writes.asked.items():
            if name not in now:
                if name in writes.snapshots:
                    lost += sum(size for size, _ in tree.values())
                    problems.append(f"snapshot {name} succeeded but is not listed")
                continue
            out = self.base / "restore"
            shutil.rmtree(out, ignore_errors=True)
            res = cli(self.world, "restore", "--snapshot", now[name]["id"], "--to", str(out))
            got = tree_digest(out) if res.returncode == 0 else {}
            if got != tree:
                lost += sum(size for size, _ in tree.values())
                problems.append(f"snapshot {name} does not restore to the tree it was taken of")
        problems += self._check_chain()
        return not problems and lost == 0, lost, "; ".join(problems)

    def trial(self, op: Operation, at: str | None = None) -> tuple[bool, int, str]:
        """One kill and recovery: (recovered, bytes lost, what went wrong). The kill comes
        after a random delay, or, with ``at``, exactly at that step (a kill point of
        tests/killpoint.py, ``MODULE:QUALNAME:before|after[:N]``; a trial whose command never
        reaches it fails)."""
        if op.kind == "mount":
            return self.mount_trial(op)
        tpl, took, before = self._template(op)
        shutil.rmtree(self.world, ignore_errors=True)
        shutil.copytree(tpl, self.world, symlinks=True)
        start = [sys.executable, "-m", "cli.main"]
        if at is not None:
            start = [sys.executable, str(ROOT / "tests" / "killpoint.py"), at]
        proc = subprocess.Popen(
            [*start, *self._args(op.command)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(self.world),
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=600 if at else self.rng.uniform(0, took * 1.1))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        problems = []
        if at is not None and proc.returncode != -signal.SIGKILL:
            problems.append(f"the command exited {proc.returncode} before kill point {at}")
        steps = [("flush",), *([self._args(op.finish)] if op.finish else []), ("flush",)]
        for step in steps:
            res = cli(self.world, *step)
            if res.returncode != 0:
                problems.append(
                    f"`{' '.join(step)}` exited {res.returncode}: "
                    + res.stderr.decode(errors="replace").strip()[-300:]
                )
        problems += _verify(self.world)
        lost, why = self._check_snapshots(before, op)
        problems += why + self._check_chain()
        return not problems and lost == 0, lost, "; ".join(problems)

    def _check_chain(self) -> list[str]:
        """Problems with the manifest chain on the remotes (empty: linear and restorable)."""
        from vaultfs import manifest
        from vaultfs.errors import IntegrityError
        from vaultfs.keys import read_keyfile

        keys = read_keyfile(self.world / "home" / "key.json", PASSPHRASE)
        found: dict[int, dict[bytes, manifest.Manifest]] = {}
        for r in REMOTES:
            for f in (self.world / r / "manifests").glob("*"):
                try:
                    m = manifest.read(keys, f.read_bytes())
                except IntegrityError:
                    # an older index copy kept under a suite a re-encryption retired: readers
                    # refuse it, as restore does (a forged or torn one is verify's finding)
                    continue
                found.setdefault(m.seq, {})[m.hash] = m
        problems = [f"{len(ms)} manifests at #{seq}" for seq, ms in found.items() if len(ms) > 1]
        for ms in found.values():
            for m in ms.values():
                prev = m.contents.prev
                if prev is not None and prev.seq in found and prev.hash not in found[prev.seq]:
                    problems.append(f"#{m.seq} names a #{prev.seq} that is not on the remotes")
        out = self.base / "restore-remotes"
        shutil.rmtree(out, ignore_errors=True)
        froms = [a for r in REMOTES for a in ("--from", str(self.world / r))]
        res = cli(self.world, "restore", *froms, "--to", str(out), "--json")
        if res.returncode != 0:
            return [*problems, f"restore from the remotes exited {res.returncode}"]
        rep = json.loads(res.stdout)
        newest = json.loads(_ok(self.world, "status", "--json"))
        if rep["fork"] or (rep["seq"], rep["manifest_hash"]) != (
            newest["seq"],
            newest["manifest_hash"],
        ):
            problems.append(f"restore from the remotes used {rep['seq']}, fork {rep['fork']}")
        return problems

    def _check_snapshots(self, before: list[dict], op: Operation) -> tuple[int, list[str]]:
        # a backup of WORLD/srcN restores as srcN/...
        sources = [
            {f"{name}/{path}": v for path, v in tree_digest(self.world / name).items()}
            for name in ("src1", "src2")
        ]
        try:
            now = snapshots(self.world)
        except RuntimeError as e:
            total = sum(s["bytes"] for s in before)
            return total, [f"snapshots cannot be listed: {e}"]
        lost = 0
        problems = []
        ids = {s["id"] for s in now}
        for s in before:
            if s["id"] not in ids:
                lost += s["bytes"]
                problems.append(f"committed snapshot {s['id']} is gone")
        for s in now:
            out = self.base / "restore"
            shutil.rmtree(out, ignore_errors=True)
            res = cli(self.world, "restore", "--snapshot", s["id"], "--to", str(out))
            got = tree_digest(out) if res.returncode == 0 else {}
            if got not in sources:
                lost += s["bytes"] if s["id"] in {b["id"] for b in before} else 0
                problems.append(f"snapshot {s['id']} does not restore to a source tree")
        return lost, problems

    def run(
        self, op: Operation, trials: int, progress: Callable[[str], None] | None = None
    ) -> Result:
        """``trials`` trials of ``op``; ``progress`` gets a line per trial."""
        res = Result(op.name)
        for n in range(1, trials + 1):
            ok, lost, why = self.trial(op)
            res.trials += 1
            res.recovered += ok
            res.bytes_lost += lost
            if not ok:
                res.failures.append(f"trial {n}: {why}")
            if progress:
                progress(f"{op.name} trial {n}: " + ("recovered" if ok else f"FAILED: {why}"))
        return res


def _verify(world: Path) -> list[str]:
    """Problems ``verify --read-all`` finds: its exit code and, per remote, what it named."""
    res = cli(world, "verify", "--read-all", "--json")
    if res.returncode == 0:
        return []
    found = []
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for r in json.loads(res.stdout)["remotes"]:
            for kind in ("missing", "corrupt", "stale", "foreign", "fork"):
                found += [f"{kind} {r['remote']}:{nm}" for nm in r[kind][:3]]
            if r["stale_manifest"] or r["unreachable"]:
                found.append(f"{r['remote']}: stale manifest or unreachable")
    said = found or [res.stderr.decode(errors="replace").strip()[-300:]]
    return [f"verify --read-all exited {res.returncode} ({', '.join(said)})"]


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` has exited (a daemon is not our child: poll it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} did not exit")


def table(results: list[Result]) -> str:
    """The trial table: operation, trials, recovered, bytes lost."""
    lines = [f"{'operation':16} {'trials':>6} {'recovered':>9} {'bytes lost':>10}"]
    for r in results:
        lines.append(f"{r.operation:16} {r.trials:>6} {r.recovered:>9} {r.bytes_lost:>10}")
    return "\n".join(lines)
