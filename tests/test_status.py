"""What `vaultfs status` says about each remote, through the real command line and real
rclone remotes (issue 15's small things): a slow remote a quorum backup left behind is not
`failing`; tables never cut what a user needs, on a terminal or off one."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from helpers import empty_remote, init_local_vault, on_a_terminal, remote_args, run_cli

from bench.netem import Link

FAST = Link(rtt=0.004, rate_bps=400e6)
SLOW = Link(rtt=1.0, rate_bps=1e6)


def _status(home: Path) -> dict:
    return json.loads(run_cli("status", "--json", home=home).stdout)


@pytest.mark.network
def test_a_slow_remote_cut_off_at_quorum_is_behind_not_failing(tmp_path, emulated_network):
    """`backup` ends at quorum while the slow remote's upload still runs (cut off with the
    command): that remote is healthy, only behind. Its health stays as the audit left it and
    no error is recorded (the routine's remote-down alert reads last_error), its queue shows
    what it has not received, and a flush on a fast link places it."""
    net = emulated_network([FAST] * 3)
    home = tmp_path / "home"
    specs = [r.spec("bkt/v") for r in net.remotes]
    run_cli("init", "-k", "2", "-n", "3", "--segment-mib", "1", *remote_args(specs), home=home)
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(15)
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(rng.randbytes(700_000))
    run_cli("backup", str(src), home=home)
    run_cli("verify", home=home)
    assert [r["health"] for r in _status(home)["remotes"]] == ["ok"] * 3
    net.set_link(2, SLOW)
    (src / "g.bin").write_bytes(rng.randbytes(2_000_000))
    rep = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)
    assert rep["complete"] is False, rep  # the slow remote was still uploading: cut off
    st = _status(home)
    slow = st["remotes"][2]
    assert slow["queued_objects"] > 0, slow
    assert [r["health"] for r in st["remotes"]] == ["ok"] * 3, st["remotes"]
    assert [r["last_error"] for r in st["remotes"]] == [None] * 3, st["remotes"]
    net.set_link(2, FAST)
    assert json.loads(run_cli("flush", "--json", home=home).stdout)["complete"] is True
    assert _status(home)["remotes"][2]["queued_objects"] == 0


def _on_terminal(home: Path, columns: int, *args: str) -> str:
    """`vaultfs ARGS` on a pseudo-terminal ``columns`` wide: its output, colours stripped."""
    code, got = on_a_terminal(list(args), home, columns=columns, stdout=True)
    assert code == 0, got
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", got).replace("\r\n", "\n")


def test_tables_never_cut_what_a_user_needs(tmp_path: Path) -> None:
    """`status`, `verify` and `remote list` (every table goes through cli.common.print_table):
    off a terminal the table has its natural width, however wide; on a wide terminal too;
    on a narrow one a list of records. Never a cell cut ('…') or a remote name broken."""
    deep = tmp_path / ("a-remote-directory-with-a-long-name-" * 2)
    home, remotes = init_local_vault(
        deep, prefix="remote-number-", home=tmp_path / "home", segment_mib=None
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(random.Random(3).randbytes(300_000))
    run_cli("backup", str(src), home=home)
    for cmd in (("status",), ("verify",), ("remote", "list")):
        piped = run_cli(*cmd, home=home).stdout.decode()
        wide = _on_terminal(home, 400, *cmd)
        narrow = _on_terminal(home, 60, *cmd)
        for text in (piped, wide, narrow):
            assert "…" not in text, text
        for text in (piped, wide):  # one table row per remote, the name whole on it
            rows = [line for line in text.splitlines() if str(remotes[0].parent) in line]
            assert len(rows) == 3 and all("┃" not in r for r in rows), text
            assert max(len(line) for line in text.splitlines()) > 160, text
        # the narrow terminal: one record per remote, its name on a line of its own
        for r in remotes:
            assert f"\n{r}\n" in f"\n{narrow}", narrow
        assert "\n  domain: remote1\n" in narrow or "\n  state: ok\n" in narrow, narrow


def test_remote_replace_leaves_the_new_remote_ok_and_the_old_one_holding_nothing(tmp_path):
    """Issue 15: after `remote replace` of a lost remote, the new one showed `stale` until the
    next `verify`, and the removed one still listed '1 placed'. The replace wrote and
    checked the new remote: it is `ok` at once (never audited, and said so plainly), and
    the removed one holds nothing placed or lost, in `status` and `remote list`."""
    home, remotes = init_local_vault(tmp_path, segment_mib=None)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.bin").write_bytes(random.Random(4).randbytes(300_000))
    run_cli("backup", str(src), home=home)
    empty_remote(remotes[2])
    run_cli("verify", home=home, check=12)  # it is found lost: degraded and stale
    new = tmp_path / "r3"
    run_cli("remote", "replace", str(remotes[2]), str(new), home=home)
    listed = {
        r["remote"]: r for r in json.loads(run_cli("remote", "list", "--json", home=home).stdout)
    }
    assert listed[str(new)]["health"] == "ok", listed[str(new)]
    assert listed[str(new)]["placed_objects"] == listed[str(remotes[0])]["placed_objects"]
    gone = listed[str(remotes[2])]
    assert gone["member"] == "removed" and gone["placed_objects"] == gone["lost_objects"] == 0
    assert [r["health"] for r in _status(home)["remotes"]] == ["ok"] * 3
    table = run_cli("remote", "list", home=home).stdout.decode()
    row = next(line for line in table.splitlines() if str(new) in line)
    assert "│ never " in row and " - " not in row, row


def _mark_unreachable(index, rid: int) -> None:
    """What `vaultfs verify` records of a remote it could not reach."""
    import time

    from vaultfs.index import remotes as remote_table

    with index.tx() as db:
        remote_table.record_health(db, rid, "unreachable", time.time(), "connection refused")
        remote_table.note_result(db, rid, "connection refused", time.time())


def test_a_flush_with_nothing_queued_asks_only_the_remotes_marked_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every remote reachable, a flush with nothing queued makes no remote call at all;
    with one marked unreachable it lists that one's manifests/ once (and no other remote),
    and, the remote answering, clears the mark: `ok`, no error, counted as placed again."""
    from helpers import PASSPHRASE

    from vaultfs.backends import Metered
    from vaultfs.index import remotes as remote_table
    from vaultfs.vault import Vault

    home, _dirs = init_local_vault(tmp_path)
    (tmp_path / "f.txt").write_text("kept")
    run_cli("backup", str(tmp_path / "f.txt"), home=home)
    calls: list[tuple[str, str]] = []
    for name in ("list", "list_sizes", "list_tree", "cat", "get", "get_dir", "move_dir"):
        real = getattr(Metered, name)  # the outer layer of every backend (open_backend)

        def counted(self, *a, _real=real, _name=name, **kw):
            calls.append((_name, self.spec))
            return _real(self, *a, **kw)

        monkeypatch.setattr(Metered, name, counted)
    v = Vault.open(home, PASSPHRASE)
    try:
        rep = v.flush()
        assert rep.complete and calls == [], calls
        rid, spec = remote_table.active(v.index)[1]
        _mark_unreachable(v.index, rid)
        design = v.status()["survives_losses_design"]
        assert v.status()["survives_losses_now"] < design
        rep = v.flush()
        assert rep.complete and calls == [("list", spec)], calls
        health = v.remote_health(rid)
        assert health["health"] == "ok" and health["health_detail"] is None, health
        assert remote_table.last_error(v.index, rid) is None
        assert v.status()["survives_losses_now"] == design
        calls.clear()
        assert v.flush().complete and calls == []  # cleared: not asked again
    finally:
        v.close()


@pytest.mark.network
def test_a_remote_back_after_an_audit_found_it_unreachable_is_cleared_by_a_flush(
    tmp_path: Path, rclone_bin: Path
) -> None:
    """`verify` finds a stopped webdav remote unreachable; while it stays down a flush with
    nothing queued leaves the mark; once it is back, `vaultfs flush` (nothing to upload)
    clears it in `status` without waiting for the next verify (it used to stay
    `unreachable`, and survives_losses_now short, until then)."""
    from helpers import WebdavServer

    from vaultfs.remotes import Remote

    server = WebdavServer(tmp_path / "webdav", rclone_bin)
    try:
        dav = server.remote("vault")
        home = tmp_path / "home"
        run_cli("init", "-k", "2", "-n", "3", "-r", str(tmp_path / "a"), "-r", str(tmp_path / "b"),
                "-r", dav, "--segment-mib", "1", home=home)  # fmt: skip
        (tmp_path / "f.txt").write_text("kept")
        run_cli("backup", str(tmp_path / "f.txt"), home=home)
        run_cli("flush", home=home)

        def dav_health() -> tuple[str, dict]:
            st = _status(home)
            return next(r for r in st["remotes"] if r["remote"] == Remote(dav).label)["health"], st

        server.stop()
        run_cli("verify", home=home, check=11)
        health, st = dav_health()
        assert health == "unreachable" and st["survives_losses_now"] < st["survives_losses_design"]
        run_cli("flush", home=home)  # still down: nothing queued for it, the mark stays
        assert dav_health()[0] == "unreachable"
        server.start()
        run_cli("flush", home=home)
        health, st = dav_health()
        assert health == "ok", health
        assert st["survives_losses_now"] == st["survives_losses_design"], st
    finally:
        server.stop()
