"""A remote that accepts connections and never answers (review9, finding 4) costs a command
about its bound (vaultfs.remotes.SILENT_AFTER, ``VAULTFS_SILENT_AFTER``), not minutes of
rclone timeouts times retries: it is then treated as unreachable and the command goes on
with the others, saying so. A slow remote whose bytes keep coming is never cut off.

Real parts: a real listener on 127.0.0.1 that never sends a byte (helpers.SilentServer) in
place of a WebDAV remote, real rclone, the real command line. The bounds asserted are
loose (the machine is shared): the old code took about three minutes for each of these.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from helpers import SilentServer, WebdavServer, run_cli, tree_digest, vaultfs_env

from bench.netem import Link
from vaultfs.backends import Pace, Paced, Retrying, open_backend
from vaultfs.errors import Unreachable
from vaultfs.restore import open_remote_index, restore_files
from vaultfs.vault import Vault

#: what each command may cost at most here: its bound (20 s, or the test's) plus set-up,
#: on a loaded machine; the old code took 40 s to 3 minutes
LOOSE = 60.0


def _vault(tmp_path: Path, rclone_bin: Path) -> tuple[Path, list[str], WebdavServer, Path]:
    """A 2-of-4 vault over three local directories and a WebDAV server, backed up once:
    (home, specs, the WebDAV server (running), the source tree)."""
    dav = WebdavServer(tmp_path / "dav", rclone_bin)
    home = tmp_path / "home"
    specs = [str(tmp_path / f"loc{i}") for i in range(3)] + [dav.remote("vault")]
    args = ["init", "-k", "2", "-n", "4"]
    for s in specs:
        args += ["-r", s]
    run_cli(*args, home=home)
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(9)
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(rng.randbytes(200_000))
    (src / "note.txt").write_text("kept\n")
    run_cli("backup", str(src), home=home)
    return home, specs, dav, src


def _timed(*args: str, home: Path, check: int, **env: str):
    t0 = time.monotonic()
    proc = run_cli(*args, home=home, check=check, timeout=240, env=vaultfs_env(home, **env))
    return proc, time.monotonic() - t0


def test_restore_with_k_good_remotes_does_not_wait_on_a_silent_one(tmp_path, rclone_bin):
    """`restore --from SILENT --from A --from B --from C`: A, B and C suffice; the silent
    remote costs its 20 s bound (the default), then the restore ends, naming it."""
    home, specs, dav, src = _vault(tmp_path, rclone_bin)
    dav.stop()
    with SilentServer(dav.port) as silent:
        proc, secs = _timed(
            "restore", *[a for s in [specs[3], *specs[:3]] for a in ("--from", s)],
            "--keyfile", str(home / "key.json"), "--to", str(tmp_path / "out"),
            home=tmp_path / "fresh", check=0,
        )  # fmt: skip
        assert silent.accepted > 0, "rclone did reach the silent server"
    assert secs < LOOSE, f"restore took {secs:.0f}s with a silent remote beside k good ones"
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    err = proc.stderr.decode()
    label = open_backend(specs[3]).label
    assert label in err and "no answer within 20s" in err, err


def test_backup_and_flush_with_a_silent_member_cost_its_bound(tmp_path, rclone_bin):
    """A vault member that hangs: `backup` places the snapshot on the others and `flush`
    reports the remote as behind (exit 3), each after about the bound (here the tunable
    VAULTFS_SILENT_AFTER=6), where the old code took 41 s and 183 s."""
    home, specs, dav, src = _vault(tmp_path, rclone_bin)
    label = open_backend(specs[3]).label
    dav.stop()
    (src / "new.txt").write_text("six b\n")
    with SilentServer(dav.port) as silent:
        proc, secs = _timed("backup", str(src), home=home, check=0, VAULTFS_SILENT_AFTER="6")
        assert secs < LOOSE, f"backup took {secs:.0f}s with a silent member"
        out = proc.stdout.decode() + proc.stderr.decode()
        assert f"{label} (" in out and "behind" in out, out
        proc, secs = _timed("flush", home=home, check=3, VAULTFS_SILENT_AFTER="6")
        assert secs < LOOSE, f"flush took {secs:.0f}s with a silent member"
        err = proc.stderr.decode()
        assert "no answer within 6s" in err and label in err, err
        assert "did not list its manifests within 6s" in err, err
        assert silent.accepted > 0
    # the other remotes hold the snapshot: a restore without the WebDAV remote has it all
    run_cli(
        "restore", *[a for s in specs[:2] for a in ("--from", s)],
        "--keyfile", str(home / "key.json"), "--to", str(tmp_path / "out"),
        home=tmp_path / "fresh",
    )  # fmt: skip
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    # and once it answers again, a flush places what it missed
    dav.start()
    try:
        run_cli("flush", home=home)
    finally:
        dav.stop()


def test_a_silent_remote_is_asked_once_per_hold_and_never_retried_at_once():
    """The wrappers: a silent failure is not retried, and while the pace holds it every
    later operation fails at once without asking; a success there ends the hold."""
    calls = []

    class Hanging:
        spec = label = "hanging:"
        rid = None
        local_dir = None
        answer = False

        def list(self, sub: str) -> list[str]:
            calls.append(sub)
            if not self.answer:
                raise Unreachable("hanging:: list failed: no answer within 20s (…)", silent=True)
            return []

    base = Hanging()
    pace = Pace(silent_hold=3600.0)
    b = Retrying(Paced(base, pace), sleep=lambda s: None)
    with pytest.raises(Unreachable) as e:
        b.list("manifests")
    assert e.value.silent and calls == ["manifests"], "asked once, not retried"
    with pytest.raises(Unreachable, match="not asked again") as e:
        b.list("data")
    assert e.value.silent and calls == ["manifests"], "not asked while held"
    pace.silent_hold = 0.0  # the hold passed: it is asked again, and it answers
    pace.silenced("again")
    base.answer = True
    assert b.list("data") == [] and calls == ["manifests", "data"]
    pace.silent_hold = 3600.0
    assert b.list("meta") == [], "a success ended the hold"


@pytest.mark.network
def test_a_slow_remote_whose_bytes_keep_coming_is_not_cut_off(
    tmp_path, emulated_network, monkeypatch
):
    """With the bound at 3 s, a restore that must read several seconds' worth of shards
    from a slow link (2 Mbit/s) still reads them: silence is no byte for the bound, not a
    transfer longer than it."""
    from vaultfs import remotes

    monkeypatch.setattr(remotes, "SILENT_AFTER", 3.0)
    monkeypatch.setenv("VAULTFS_RCD", "0")  # rclone commands, which take the bound at once
    fast = Link(rtt=0.004, rate_bps=400e6)
    net = emulated_network([fast] * 3)
    specs = [r.spec("bkt/v") for r in net.remotes]
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(3).randbytes(1_500_000))
    with Vault.create(tmp_path / "home", specs, 2, 3, "pw", segment_size=1 << 20) as v:
        from vaultfs.backup import backup_paths

        backup_paths(v, [src])
        assert v.flush().complete
        keys = v.keys
    net.set_link(1, Link(rtt=0.2, rate_bps=2e6))  # ~750 kB to read from it: ~3 s and more
    t0 = time.monotonic()
    backends = [open_backend(s) for s in specs[:2]]  # k remotes: the slow one is needed
    db, src_, _m, _w = open_remote_index(keys, backends, tmp_path / "work")
    try:
        restore_files(keys, db, src_, tmp_path / "out")
    finally:
        db.close()
    assert tree_digest(tmp_path / "out" / "src") == tree_digest(src)
    assert time.monotonic() - t0 > 3, "the slow reads took longer than the bound"
