"""The command line as a user meets it: the main job, bad input, exit codes (errors.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import (
    PASSPHRASE,
    bytes_tree_digest,
    init_local_vault,
    make_odd_tree,
    progress_bars,
    run_cli,
    stderr_on_a_terminal,
    tree_digest,
)


def init_vault(tmp_path: Path, n_remotes: int = 5, *extra: str) -> tuple[Path, list[str]]:
    vault = init_local_vault(tmp_path, None, None, *extra, remotes=n_remotes, prefix="remote")
    return vault.home, vault.specs


def test_pg_dump_stdin_backup_and_disaster_restore(tmp_path, pg_server):
    """The main job: pg_dump | vaultfs backup --stdin; lose 2 remotes and all local state."""
    pg_server.make_kb(1500, seed=11, dbname="kb_cli")
    source = pg_server.table_checksums("kb_cli")
    home, remotes = init_vault(tmp_path)
    dump = subprocess.run(
        [str(Path(pg_server.bin_dir) / "pg_dump"), "-Fp", pg_server.dsn_for("kb_cli")],
        capture_output=True,
        check=True,
    ).stdout
    out = run_cli(
        "backup", "--stdin", "--stdin-filename", "dumps/kb.sql", "--json", home=home, input=dump
    )
    info = json.loads(out.stdout)
    assert info["complete"] and info["bytes"] == len(dump) and info["survives_losses_now"] == 2
    snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert [s["id"] for s in snaps] == [info["snapshot"]]
    listing = json.loads(run_cli("ls", "latest", "--json", home=home).stdout)
    assert {e["path"]: e["size"] for e in listing}["dumps/kb.sql"] == len(dump)

    keyfile = tmp_path / "usb-stick" / "key.json"
    keyfile.parent.mkdir()
    shutil.copy(home / "key.json", keyfile)
    shutil.rmtree(home)
    shutil.rmtree(remotes[1])
    shutil.rmtree(remotes[3])
    empty_home = tmp_path / "new-machine"
    run_cli(
        "restore", "--from", remotes[0], "--from", remotes[2], "--from", remotes[4],
        "--to", str(tmp_path / "restored"), "--keyfile", str(keyfile), home=empty_home,
    )  # fmt: skip
    restored = (tmp_path / "restored" / "dumps" / "kb.sql").read_bytes()
    assert restored == dump
    pg_server.create_database("kb_restored")
    pg_server.psql_file("kb_restored", tmp_path / "restored" / "dumps" / "kb.sql")
    assert pg_server.table_checksums("kb_restored") == source


def test_paths_backup_include_and_second_snapshot(tmp_path):
    home, remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    src = tmp_path / "data"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "one.txt").write_text("one\n" * 1000)
    (src / "two.bin").write_bytes(os.urandom(200_000))
    first = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)["snapshot"]
    (src / "two.bin").write_bytes(b"changed")
    run_cli("backup", str(src), "--name", "after-change", home=home)
    run_cli(
        "restore", "--from", remotes[0], "--from", remotes[2], "--snapshot", first,
        "--include", "data/two.bin", "--to", str(tmp_path / "out"), home=home,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["two.bin"]
    assert len((tmp_path / "out" / "data" / "two.bin").read_bytes()) == 200_000
    run_cli("restore", "--snapshot", "after-change", "--to", str(tmp_path / "o2"), home=home)
    assert tree_digest(tmp_path / "o2" / "data") == tree_digest(src)
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["snapshots"] == 2 and st["k"] == 2 and st["n"] == 3


def test_restore_reports_the_bytes_snapshots_lists_with_hard_links(tmp_path):
    """A hard link's every name counts in a snapshot's logical bytes; `restore` said fewer
    (it wrote the group once), so the same snapshot had two sizes."""
    home, _remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    src = tmp_path / "data"
    src.mkdir()
    (src / "a.txt").write_text("12345678")
    os.link(src / "a.txt", src / "b.txt")
    (src / "c.bin").write_bytes(os.urandom(5000))
    uid = json.loads(run_cli("backup", str(src), "--json", home=home).stdout)["snapshot"]
    listed = json.loads(run_cli("snapshots", "--json", home=home).stdout)
    assert [s["bytes"] for s in listed if s["id"] == uid] == [8 + 8 + 5000], listed
    args = ["restore", "--snapshot", uid, "--to", str(tmp_path / "out"), "--json"]
    rep = json.loads(run_cli(*args, home=home).stdout)
    assert rep["bytes"] == 8 + 8 + 5000, rep
    out = tmp_path / "out" / "data"
    assert os.stat(out / "a.txt").st_ino == os.stat(out / "b.txt").st_ino  # still one file


def test_names_of_any_bytes_and_special_files_round_trip(tmp_path):
    """backup PATH of a tree with non-UTF-8 names, newlines, a fifo, a socket and (as root)
    devices; ls shows the names escaped and --json exactly; restore from k remotes with no
    local state gives every name, type, device number, xattr and hard link back."""
    home, remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    src = tmp_path / "odd"
    make_odd_tree(src)
    run_cli("backup", str(src), "--name", "odd", home=home)
    text = run_cli("ls", "odd", home=home).stdout.decode()
    assert "odd/caf\\xe9/\\xff\\xfe.txt" in text and "odd/caf\\xe9/new\\nline.txt" in text
    assert "odd/caf\\xe9/back\\\\slash.txt" in text  # a real backslash, escaped
    assert "odd/link\\x80 -> caf\\xe9/\\xff\\xfe.txt" in text
    assert len(text.splitlines()) == len(bytes_tree_digest(src)) + 1  # one line each
    listing = json.loads(run_cli("ls", "odd", "--json", home=home).stdout)
    by_raw = {bytes.fromhex(e["path_hex"]) if "path_hex" in e else e["path"].encode(): e for e in listing}  # fmt: skip
    assert by_raw[b"odd/caf\xe9/new\nline.txt"]["path"] == "odd/caf\udce9/new\nline.txt"
    assert by_raw[b"odd/caf\xe9/\xff\xfe/fifo\xfe"]["type"] == "p"
    assert by_raw[b"odd/sock\xe9"]["type"] == "s"
    assert "path_hex" not in by_raw[b"odd"] and by_raw[b"odd"]["path"] == "odd"
    sub = json.loads(run_cli("ls", "odd", os.fsdecode(b"odd/caf\xe9/\xff\xfe"), "--json", home=home).stdout)  # fmt: skip
    assert [e["path_hex"] for e in sub] == [
        b"odd/caf\xe9/\xff\xfe".hex(),
        b"odd/caf\xe9/\xff\xfe/fifo\xfe".hex(),
    ]
    if os.geteuid() == 0:
        assert by_raw[b"odd/null\xff"]["type"] == "c"
        assert by_raw[b"odd/null\xff"]["rdev"] == os.makedev(1, 3)
    shutil.rmtree(remotes[1])
    out = tmp_path / "restored"
    run_cli(
        "restore", "--from", remotes[0], "--from", remotes[2], "--snapshot", "odd",
        "--to", str(out), "--keyfile", str(home / "key.json"), home=tmp_path / "new-machine",
    )  # fmt: skip
    assert bytes_tree_digest(out / "odd") == bytes_tree_digest(src)
    # with local state, restoring only the directory whose name is not UTF-8
    out2 = tmp_path / "restored2"
    run_cli(
        "restore", "--include", os.fsdecode(b"odd/caf\xe9"), "--to", str(out2), home=home
    )  # fmt: skip
    want = {p: v[0] for p, v in bytes_tree_digest(src).items() if p.startswith(b"caf\xe9")}
    assert {p: v[0] for p, v in bytes_tree_digest(out2 / "odd").items()} == want
    assert (
        out2 / os.fsdecode(b"odd/caf\xe9/\xff\xfe.txt")
    ).read_bytes() == b"content of " + b"\xff\xfe" * 100


def test_fewer_remotes_than_shards_is_honest(tmp_path):
    home, _ = init_vault(tmp_path, 2)  # 3-of-5 over two remotes: 3 + 2 shards per segment
    st = json.loads(run_cli("status", "--json", home=home).stdout)
    assert st["survives_losses_design"] == 0
    out = run_cli("init", "--remote", str(tmp_path / "x"), home=tmp_path / "h2")
    assert "losing any one loses data" in out.stderr.decode()
    assert "with the remote they restore everything" in out.stdout.decode()
    # 5-of-9 over 3 remotes: 3 shards on each, so any 2 remotes restore (not "any 5")
    remotes = [arg for i in range(3) for arg in ("--remote", str(tmp_path / f"y{i}"))]
    out = run_cli("init", "--profile", "federation", *remotes, home=tmp_path / "h3")
    assert "with any 2 of the 3 remotes they restore everything" in out.stdout.decode()
    assert "up to 3 of each segment's 9 shards share one remote" in out.stderr.decode()


def test_bad_input_gets_clear_errors_and_exit_codes(tmp_path):
    home, remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    src = tmp_path / "f.txt"
    src.write_text("hello\n")
    run_cli("backup", str(src), home=home)

    def fails(code: int, needle: str, *args: str, **kw) -> None:
        proc = run_cli(*args, home=kw.pop("h", home), check=code, **kw)
        msg = " ".join(proc.stderr.decode().split())  # rich wraps long messages
        assert needle in msg, msg
        assert "Traceback" not in msg

    fails(10, "wrong passphrase", "status", passphrase="nope")
    fails(16, "already exists", "init", "--remote", str(tmp_path / "other"))
    fails(16, "no vault", "status", h=tmp_path / "nowhere")
    fails(18, "no such file", "backup", str(tmp_path / "missing"))
    fails(18, "not both or neither", "backup")
    fails(14, "rejected remote", "init", "--remote", "nosuchremote:bucket", h=tmp_path / "h3")
    fails(18, "unknown profile", "init", "--remote", "/x", "--profile", "huge", h=tmp_path / "h4")
    fails(18, "need 1 <= k < n", "init", "--remote", "/x", "-k", "5", "-n", "3", h=tmp_path / "h5")
    fails(18, "invalid path", "backup", "--stdin", "--stdin-filename", "../up.sql", input=b"x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    fails(13, "not empty", "restore", "--to", str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    fails(11, "need 2", "restore", "--from", remotes[0], "--to", str(tmp_path / "o"))
    fails(
        18,
        "no snapshot with id or name 'nope'",
        "restore",
        "--snapshot",
        "nope",
        "--to",
        str(tmp_path / "o2"),
    )
    other = tmp_path / "not-a-vault"
    other.mkdir()
    fails(11, "no manifest", "restore", "--from", str(other), "--to", str(tmp_path / "o3"))
    bad_seed = _write(tmp_path / "seed.txt", "abc")
    fails(18, "64 hexadecimal", "restore", "--from", remotes[0], "--to", str(tmp_path / "o4"),
          "--seed-file", str(bad_seed))  # fmt: skip
    wrong_seed = _write(tmp_path / "seed2.txt", "11" * 32)
    fails(10, "a vault other than this key's", "restore", "--from", remotes[0], "--from", remotes[1],
          "--to", str(tmp_path / "o5"), "--seed-file", str(wrong_seed))  # fmt: skip


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_seed_file_restores_without_keyfile(tmp_path):
    from vaultfs.keys import read_keyfile

    home, remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    (tmp_path / "doc.txt").write_text("a belief worth keeping\n" * 100)
    run_cli("backup", str(tmp_path / "doc.txt"), home=home)
    seed = read_keyfile(home / "key.json", PASSPHRASE).seed
    seed_file = _write(tmp_path / "seed.hex", seed.hex())
    shutil.rmtree(home)
    run_cli(
        "restore", "--from", remotes[1], "--from", remotes[2], "--seed-file", str(seed_file),
        "--to", str(tmp_path / "out"), home=tmp_path / "empty",
    )  # fmt: skip
    assert (tmp_path / "out" / "doc.txt").read_text() == "a belief worth keeping\n" * 100


def test_restore_from_rolled_back_remotes_is_refused(tmp_path):
    """Remotes set back to an older state: a machine whose index saw the newer manifest
    refuses them (the library applies the floor, so the CLI and library callers alike)."""
    from vaultfs.backends import open_backend
    from vaultfs.errors import IntegrityError
    from vaultfs.keys import read_keyfile
    from vaultfs.restore import open_remote_index

    home, remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    (tmp_path / "doc.txt").write_text("first\n")
    run_cli("backup", str(tmp_path / "doc.txt"), home=home)
    old = [str(tmp_path / f"old{i}") for i in range(3)]
    for r, o in zip(remotes, old, strict=True):
        shutil.copytree(r, o)
    (tmp_path / "doc.txt").write_text("second\n")
    run_cli("backup", str(tmp_path / "doc.txt"), home=home)
    res = run_cli(
        "restore", "--from", old[0], "--from", old[1], "--to", str(tmp_path / "out"),
        home=home, check=12,
    )  # fmt: skip
    assert b"rollback detected" in res.stderr
    keys = read_keyfile(home / "key.json", PASSPHRASE)
    with pytest.raises(IntegrityError, match="rollback"):
        open_remote_index(keys, [open_backend(o) for o in old], tmp_path / "w", home=home)
    run_cli(
        "restore",
        "--from",
        old[0],
        "--from",
        old[1],
        "--to",
        str(tmp_path / "out2"),
        "--keyfile",
        str(home / "key.json"),
        home=tmp_path / "elsewhere",
    )  # fmt: skip  (no local index: nothing to compare with)
    assert (tmp_path / "out2" / "doc.txt").read_text() == "first\n"


def test_full_local_disk_is_a_clear_error_and_loses_nothing(tmp_path):
    """The vault home on a tiny tmpfs: the backup fails cleanly, earlier data stays intact."""
    small = tmp_path / "small"
    small.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)])
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        home = init_local_vault(tmp_path, home=small / "home").home
        (tmp_path / "ok.txt").write_text("kept\n")
        run_cli("backup", str(tmp_path / "ok.txt"), home=home)
        (tmp_path / "big.bin").write_bytes(os.urandom(30_000_000))
        proc = run_cli("backup", "--no-upload", str(tmp_path / "big.bin"), home=home, check=15)
        assert "disk full" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
        snaps = json.loads(run_cli("snapshots", "--json", home=home).stdout)
        assert len(snaps) == 1
        run_cli("restore", "--to", str(tmp_path / "out"), home=home)
        assert (tmp_path / "out" / "ok.txt").read_text() == "kept\n"
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_help_texts_are_reflowed_not_broken_mid_sentence(tmp_path):
    """typer keeps docstrings' hard line breaks; ours are joined into paragraphs, so a wide
    terminal shows each sentence on one line (and a narrow one wraps it where it fits)."""
    env = {**os.environ, "COLUMNS": "400"}
    cases = {
        ("ls", "--help"): "List the entries of a snapshot. Names that are not UTF-8, and control",
        ("repair", "--help"): "from k good shards or the local queue, and place it on a healthy",
        ("prune", "--help"): "(after `vaultfs snapshot delete`): drop unused segments, repack",
        ("verify", "--help"): "enough random block checks to detect a 1% block loss with 99%",
        ("--help",): "Names that are not UTF-8, and control characters, are shown escaped",
    }
    for args, sentence in cases.items():
        text = run_cli(*args, home=tmp_path, env=env).stdout.decode()
        assert any(sentence in line for line in text.splitlines()), (args, text)


def test_long_commands_show_progress_on_a_terminal_only(tmp_path):
    home, _ = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    drawn = stderr_on_a_terminal(["backup", str(big)], home)
    assert "backup" in drawn and "/s" in drawn and "MB" in drawn  # bytes, rate, time left
    quiet = stderr_on_a_terminal(["backup", "--json", str(big)], home)
    assert "/s" not in quiet
    run_cli("snapshot", "delete", "latest", home=home)
    run_cli("snapshot", "delete", "latest", home=home)
    drawn = stderr_on_a_terminal(["prune"], home)
    assert "prune" in drawn and re.search(r"[\d.]+/[\d.]+ MB", drawn)  # too quick for a rate


def test_verify_repair_and_backup_progress_know_their_totals(tmp_path):
    """On a terminal: backup's bar has the files' total and a time left; `verify --read-all`
    and the sampled audit show bytes read of the bytes to read; repair shows the rebuilt
    bytes written of those to rebuild (the lost remote's shards), not segments counted as
    whole segments with no total."""
    home, remotes = init_vault(tmp_path, 3, "-k", "2", "-n", "3")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    bars = progress_bars(stderr_on_a_terminal(["backup", str(big)], home), "backup")
    assert bars and {t for _d, t, _e in bars} == {25.2}, bars  # 25,165,824 bytes
    assert bars[-1][0] == 25.2
    for args in (["verify", "--read-all"], ["verify"]):
        bars = progress_bars(stderr_on_a_terminal(args, home), "verify")
        assert bars and bars[-1][0] == bars[-1][1] > 0, (args, bars)
    whole = sum(p.stat().st_size for r in remotes for p in Path(r).glob("data/*"))
    bars = progress_bars(stderr_on_a_terminal(["verify", "--read-all"], home), "verify")
    assert bars[-1][1] >= round(whole / 1e6, 1)  # every data object (and meta ones)
    lost = Path(remotes[1])
    rebuilt = sum(p.stat().st_size for sub in ("data", "meta") for p in lost.glob(f"{sub}/*"))
    shutil.rmtree(lost)
    lost.mkdir()  # a new, empty disk at its path
    bars = progress_bars(stderr_on_a_terminal(["repair"], home), "repair")
    assert bars and bars[-1][1] == round(rebuilt / 1e6, 1) == bars[-1][0], (bars, rebuilt)
    quiet = stderr_on_a_terminal(["verify", "--read-all", "--json"], home)
    assert "/s" not in quiet


def test_mount_helper_takes_what_mount8_passes():
    from cli.fstab import parse

    home, mp, opts, fake = parse(
        ["/h", "/mnt", "-n", "-o", "rw,noauto,_netdev,x-systemd.automount,cache_size=2G,"
         "passphrase_file=/etc/p", "-t", "vaultfs"]
    )  # fmt: skip
    assert (home, mp, opts, fake) == (
        "/h",
        "/mnt",
        {"cache_size": "2G", "passphrase_file": "/etc/p"},
        False,
    )
    assert parse(["/h", "/mnt", "-fv"])[3] is True
    for bad in (["/h"], ["/h", "/mnt", "-o", "ro,uid=3"], ["/h", "/mnt", "-x"], ["/h", "/mnt", "-o"],
                ["/h", "/mnt", "-o", "cache_size="]):  # fmt: skip
        with pytest.raises(ValueError):
            parse(bad)


def test_a_commands_help_loads_none_of_the_engine():
    """`vaultfs status --help` imports cli/core.py and typer, and none of the engine: the
    vault, the index, the remote stack, the YAML parser, the erasure or chunking libraries
    (each imported where a command uses it). Its help and exit code are unchanged."""
    import sys

    probe = (
        "import sys\n"
        "from cli.common import app\n"
        "sys.argv = ['vaultfs', 'status', '--help']\n"
        "try:\n"
        "    app()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, env=env, cwd=root, check=True
    )
    assert "Show remotes, queue, redundancy" in proc.stdout.decode()
    loaded = set(proc.stderr.decode().split())
    assert "cli.core" in loaded
    engine = {"vaultfs.vault", "vaultfs.index", "vaultfs.remotes", "vaultfs.strategy", "ruamel"}
    assert not (engine | {"pyeclib", "pyfastcdc", "vaultfs.shamir", "cli.mounted"}) & loaded


def test_a_command_imports_only_its_module_and_the_map_is_complete():
    """`vaultfs restore --help` imports cli/restore.py and none of the other command modules
    (nor the mount, the knowledge base or psycopg); once every module is imported, the
    commands they registered are exactly cli.common.COMMANDS, in its order."""
    import sys

    probe = (
        "import sys\n"
        "from cli.common import COMMANDS, app\n"
        "sys.argv = ['vaultfs', 'restore', '--help']\n"
        "try:\n"
        "    app()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, env=env, cwd=root, check=True
    )
    loaded = set(proc.stderr.decode().split())
    assert "cli.restore" in loaded
    from cli.common import COMMANDS

    others = set(COMMANDS.values()) - {"cli.restore"}
    assert not others & loaded, others & loaded
    assert not {"psycopg", "vaultfs.fs", "vaultfs.kb", "vaultfs.vault"} & loaded

    import importlib

    from cli.common import app

    for module in set(COMMANDS.values()):
        importlib.import_module(module)
    registered = [i.name or i.callback.__name__ for i in app.registered_commands]
    registered += [g.name for g in app.registered_groups]
    assert sorted(registered) == sorted(COMMANDS)


def _full_tmpfs(tmp_path: Path, size: str = "12m") -> Path:
    """A small tmpfs at tmp_path/small (skip where one cannot be mounted); umount it after."""
    small = tmp_path / "small"
    small.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)])
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return small


def _fill(fs: Path, leave: int) -> Path:
    """Fill the file system at ``fs`` up to ``leave`` bytes free; the filler file."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    subprocess.run(
        ["fallocate", "-l", str(st.f_bavail * st.f_frsize - leave), str(filler)], check=True
    )
    return filler


def test_init_on_a_full_disk_leaves_nothing_and_can_be_rerun(tmp_path):
    """`init` with the home's disk full: exit 15 and one line, nothing left of a half-made
    home (neither a new one nor in one that held other files), so once space is freed the
    same `init` works; and a backup whose index commit meets SQLite's "database or disk is
    full" says disk full (15), no traceback."""
    small = _full_tmpfs(tmp_path)
    try:
        home = small / "home"
        remotes = [str(tmp_path / f"r{i}") for i in range(3)]
        init = ["init", "-k", "2", "-n", "3", *sum((["-r", r] for r in remotes), [])]
        run_cli(*init, home=home)
        (tmp_path / "a.txt").write_text("a\n")
        run_cli("backup", str(tmp_path / "a.txt"), home=home)
        used = small / "used"  # a home holding something already (a strategy file)
        used.mkdir(mode=0o755)
        (used / "strategy.yaml").write_text("keep me\n")
        filler = _fill(small, 8 * 1024)
        others = [str(tmp_path / f"o{i}") for i in range(2)]
        again = ["init", "-k", "1", "-n", "2", *sum((["-r", r] for r in others), [])]
        for h in (small / "new" / "home", used):
            proc = run_cli(*again, "--json", home=h, check=15)
            said = proc.stderr.decode()
            assert "disk full" in said and "Traceback" not in said, said
            assert len(said.strip().splitlines()) == 1 and proc.stdout == b"", said
        assert not (small / "new").exists()
        assert sorted(os.listdir(used)) == ["strategy.yaml"]
        assert (used / "strategy.yaml").read_text() == "keep me\n"
        assert used.stat().st_mode & 0o777 == 0o755
        filler.unlink()
        _fill(small, 40 * 1024)
        (tmp_path / "b.txt").write_text("b\n")
        proc = run_cli("backup", str(tmp_path / "b.txt"), home=home, check=15)
        said = proc.stderr.decode()
        assert "disk full" in said and "Traceback" not in said, said
        (small / "filler").unlink()
        for h in (small / "new" / "home", used):
            run_cli(*again, home=h)
            assert json.loads(run_cli("status", "--json", home=h).stdout)["snapshots"] == 0
        assert (used / "strategy.yaml").read_text() == "keep me\n"
        run_cli("backup", str(tmp_path / "b.txt"), home=home)
        assert len(json.loads(run_cli("snapshots", "--json", home=home).stdout)) == 2
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_an_init_killed_while_moving_its_files_is_rolled_back_by_the_next(tmp_path):
    """An init killed between moving its keyfile and its index into the home (index.db is
    last) left `key.json` in the home and the rest in its staging directory: commands say
    there is no vault, and the next `init` rolls the remains back and makes the vault."""
    donor, _ = init_vault(tmp_path / "donor", 2, "-k", "1", "-n", "2")
    home = tmp_path / "home"
    staging = home / ".init-x1y2z3"
    staging.mkdir(parents=True)
    shutil.copy(donor / "key.json", home / "key.json")  # moved already
    shutil.copytree(donor / "queue", home / "queue")  # moved already
    shutil.copy(donor / "index.db", staging / "index.db")  # not yet: the commit never came
    (staging / ".names").write_text("key.json\nqueue\nindex.db\n")
    (home / "lock").touch()
    proc = run_cli("status", home=home, check=16)
    assert "no vault at" in proc.stderr.decode()
    remotes = [str(tmp_path / f"new{i}") for i in range(2)]
    made = json.loads(
        run_cli(
            "init",
            "-k",
            "1",
            "-n",
            "2",
            *sum((["-r", r] for r in remotes), []),
            "--json",
            home=home,
        ).stdout  # fmt: skip
    )
    assert sorted(os.listdir(home)) == ["index.db", "key.json", "lock", "queue"]
    donor_fp = json.loads(run_cli("status", "--json", home=donor).stdout)["fingerprint"]
    assert made["fingerprint"] != donor_fp
    assert (
        json.loads(run_cli("status", "--json", home=home).stdout)["fingerprint"]
        == made["fingerprint"]
    )


def test_a_home_an_older_init_left_half_made_is_named_as_such(tmp_path):
    """An init of an older vaultfs that failed midway left key.json and an index without the
    vault's parameters: commands call it half-made and say what to delete, not that the key
    was replaced."""
    from vaultfs.index import Index

    donor, _ = init_vault(tmp_path / "donor", 1, "-k", "1", "-n", "1")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(donor / "key.json", home / "key.json")
    Index(home / "index.db").close()  # the schema, no parameters
    said = run_cli("status", home=home, check=16).stderr.decode()
    assert "holds a half-made vault" in said and "replaced" not in said, said


def test_remote_remove_and_replace_show_the_rebuild_progress_on_a_terminal_only(tmp_path):
    """`remote remove` and `remote replace` rebuild shards as repair does, and show repair's
    bar: the rebuilt bytes written of those to rebuild (the departing remote's shards), with
    a rate and a time left, on a terminal; nothing with --json nor off a terminal."""
    home, remotes = init_vault(tmp_path, 4, "-k", "2", "-n", "3")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    run_cli("backup", str(big), home=home)

    def held(remote: str) -> float:
        return round(
            sum(p.stat().st_size for s in ("data", "meta") for p in Path(remote).glob(f"{s}/*"))
            / 1e6,
            1,
        )

    size = held(remotes[3])
    bars = progress_bars(
        stderr_on_a_terminal(["remote", "remove", remotes[3]], home), "remote remove"
    )
    assert bars and bars[-1][0] == bars[-1][1] == size > 0, (bars, size)
    new = [str(tmp_path / f"new{i}") for i in range(3)]
    size = held(remotes[2])
    drawn = stderr_on_a_terminal(["remote", "replace", remotes[2], new[0]], home)
    bars = progress_bars(drawn, "remote replace")
    assert bars and bars[-1][0] == bars[-1][1] == size > 0, (bars, size)
    quiet = stderr_on_a_terminal(["remote", "replace", new[0], new[1], "--json"], home)
    assert "remote replace" not in quiet and "MB" not in quiet, quiet
    assert held(new[1]) > 0  # it rebuilt, quietly
    said = run_cli("remote", "replace", new[1], new[2], home=home).stderr.decode()  # a pipe
    assert "remote replace" not in said and "MB" not in said and held(new[2]) > 0, said
    res = run_cli("remote", "remove", new[2], home=home)
    assert b"remote remove" not in res.stderr and b"MB" not in res.stderr, res.stderr
    assert b"rebuilt" in res.stdout, res.stdout
