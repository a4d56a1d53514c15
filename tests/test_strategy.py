"""Strategy files and tiers (vaultfs/strategy.py, vaultfs/tiers.py, `vaultfs strategy`,
`vaultfs run --strategy`, `status --strategy`): bad files fail in one line naming the line
and key; `backup config --add-backend` keeps comments; four tiers (the live database, a
1_of_1 NAS, an offsite 2_of_3 over a local directory, `rclone serve s3` and `sftp`, a
permanent archive) run over simulated days keep exactly what their retention says; the NAS
alone and the offsite tier from exactly k remotes restore on an empty home; one Shamir split
of the master seed recovers every tier's key, and `init --share-file` makes a vault from it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from pathlib import Path

import pytest
from helpers import PASSPHRASE, run_cli, vaultfs_env

from vaultfs import shamir, strategy
from vaultfs.errors import ConfigError
from vaultfs.keys import VaultKeys, read_keyfile, tier_seed

#: 2026-12-10 12:00 UTC: day d of the simulation is DAY0 + d days.
DAY0 = 1796904000
DAY = 86400


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- validation --------------------------------------------------------------------------------
GOOD = """\
# tiers of the knowledge base
backup_strategy:
  primary: {backend: local_postgres, frequency: continuous}
  nas:     {backend: "nas:vault", frequency: hourly, retention: 30_days}  # one whole copy
  offsite:
    backends: ["b2:kb", ":s3,provider=Rclone:kb", "/mnt/usb/kb"]
    frequency: daily
    erasure_coding: 2_of_3
    encryption: hybrid_pq
    retention: 1_year
sources:
  - path: notes
"""


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: daily}\nsource: []\n", 3,
         ["source", "unknown key"]),
        ("backup_strategy:\n  nas: {backend: 'x:y'}\n", 2, ["nas.frequency", "missing"]),
        ("backup_strategy:\n  off:\n    backends: [a:1, a:2, a:3]\n    frequency: daily\n"
         "    erasure_coding: 3_of_3\n", 5, ["off.erasure_coding", "3_of_3"]),
        ("backup_strategy:\n  off:\n    backends: [a:1, a:2]\n    frequency: daily\n"
         "    erasure_coding: 2_of_5\n", 5, ["off.erasure_coding", "number of backends"]),
        ("backup_strategy:\n  off:\n    backends: [a:1, a:2, a:3]\n    frequency: daily\n",
         2, ["off.erasure_coding", "missing"]),
        ("backup_strategy:\n  off:\n    backends: [a:1, nas, a:3]\n    frequency: daily\n"
         "    erasure_coding: 2_of_3\n", 3, ["off.backends", "'nas' is not a backend"]),
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: daily, retention: 30_dayz}\n",
         2, ["nas.retention", "30_dayz"]),
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: continuous}\n", 2,
         ["nas.frequency", "continuous"]),
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: daily, colour: red}\n", 2,
         ["nas.colour", "unknown key"]),
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: daily\n  off: [\n", 3,
         ["YAML syntax error"]),
        ("sources: []\n", 1, ["backup_strategy", "missing"]),
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: daily}\n", 1,
         ["sources", "missing"]),
        ("backup_strategy:\n  nas: {backend: 'x:y', frequency: daily}\nsources:\n"
         "  - pg: {dsn: 'host=x dbname'}\n", 4, ["sources[0].pg.dsn", "not a libpq DSN"]),
        ("backup_strategy:\n  a: {backend: 'x:y', frequency: daily}\n"
         "  b: {backend: 'x:y', frequency: weekly}\nsources:\n  - path: n\n", 3,
         ["b.backends", "also a backend of tier a"]),
        ("backup_strategy:\n  a: {backend: /mnt/kb, frequency: daily}\n"
         "  b: {backend: /mnt/kb/old, frequency: weekly}\nsources:\n  - path: n\n", 3,
         ["b.backends", "/mnt/kb/old is inside /mnt/kb, a backend of tier a"]),
        ("backup_strategy:\n  a: {backends: ['x:kb/2026', 'y:z'], frequency: daily,"
         " erasure_coding: 1_of_2}\n  b: {backend: 'x:', frequency: weekly}\nsources:\n"
         "  - path: n\n", 3, ["b.backends", "x: holds x:kb/2026, a backend of tier a"]),
    ],
)  # fmt: skip
def test_a_bad_strategy_file_is_one_line_naming_line_and_key(
    tmp_path: Path, text: str, line: int, words: list[str]
) -> None:
    f = write(tmp_path / "s.yaml", text)
    (tmp_path / "n").mkdir()  # the sources exist: the file's one problem is the only one
    with pytest.raises(ConfigError) as e:
        strategy.load(f, tmp_path)
    assert e.value.message.startswith(f"{f}:{line}:"), e.value.message
    assert all(w in e.value.message for w in words), e.value.message
    res = run_cli("strategy", "check", str(f), home=tmp_path / "h", check=2)
    msg = res.stderr.decode().strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert f"{f.name}:{line}:" in msg


def test_strategy_check_names_every_problem_in_file_order(tmp_path: Path) -> None:
    f = write(
        tmp_path / "s.yaml",
        "backup_strategy:\n"
        "  nas: {backend: /mnt/kb, frequency: dayly, colour: red}\n"
        "  off:\n"
        "    backends: ['x:1', 'x:2', /mnt/kb/sub]\n"
        "    frequency: daily\n"
        "    erasure_coding: 3of3\n"
        "  arch: {backend: 'x:1/deep', frequency: weekly, retention: 3_dayz}\n"
        "sources:\n"
        "  - path: gone\n"
        "  - other: 1\n",
    )
    res = run_cli("strategy", "check", str(f), home=tmp_path / "h", check=2)
    lines = res.stderr.decode().splitlines()
    assert all(ln.startswith("error: ") for ln in lines), lines
    lines = [ln.removeprefix("error: ") for ln in lines]
    assert "Traceback" not in res.stderr.decode()
    assert [ln.split(": ", 2)[:2] for ln in lines] == [
        [f"{f}:2", "nas.colour"],
        [f"{f}:2", "nas.frequency"],
        [f"{f}:3", "off.backends"],
        [f"{f}:6", "off.erasure_coding"],
        [f"{f}:7", "arch.retention"],
        [f"{f}:7", "arch.backends"],
        [f"{f}:10", "sources[1]"],
        [f"{f}:9", "sources[0].path"],  # what this machine lacks comes after the file's
    ], lines
    assert "/mnt/kb/sub is inside /mnt/kb, a backend of tier nas" in lines[2]
    assert "x:1/deep is inside x:1, a backend of tier off" in lines[5]
    with pytest.raises(ConfigError) as e:  # every command reads the file the same way
        strategy.load(f, tmp_path)
    assert e.value.message.splitlines() == lines[:-1]


def test_a_missing_strategy_file_is_named(tmp_path: Path) -> None:
    res = run_cli("strategy", "check", home=tmp_path / "h", check=18)
    assert "strategy.yaml" in res.stderr.decode()
    run_cli("run", "--tier", "nas", home=tmp_path / "h", check=18)  # no vault, no strategy


def test_good_file_reads_as_typed_tiers_and_add_backend_keeps_comments(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    f = write(home / "strategy.yaml", GOOD)
    s = strategy.load(f, home)
    assert list(s.tiers) == ["primary", "nas", "offsite"]
    primary, nas, off = s.tiers.values()
    assert primary.live and not nas.live and nas.home == home / "tiers" / "nas"
    assert (nas.k, nas.n, nas.survives_losses) == (1, 1, 0)
    assert (off.k, off.n, off.survives_losses, off.frequency) == (2, 3, 1, 86400.0)
    assert off.retention is not None and str(off.retention.within) == "1y"
    assert s.sources == [strategy.Source("path", str(home / "notes"))]

    shown = json.loads(run_cli("strategy", "show", "--json", home=home).stdout)
    assert [t["name"] for t in shown["tiers"]] == ["primary", "nas", "offsite"]
    out = run_cli("backup", "config", "--add-backend", "offsite", "wasabi:kb", "--json",
                  home=home).stdout  # fmt: skip
    assert json.loads(out)["n"] == 3 + 1 and json.loads(out)["k"] == 2
    run_cli("backup", "config", "--add-backend", "nas", "/mnt/b", home=home)
    text = f.read_text()
    assert "# tiers of the knowledge base" in text and "# one whole copy" in text
    again = strategy.load(f, home)
    assert again.tiers["offsite"].backends[-1] == "wasabi:kb"
    assert (again.tiers["nas"].k, again.tiers["nas"].n) == (1, 2)
    run_cli("backup", "config", "--add-backend", "nas", "not a backend", home=home, check=2)
    # a tier name that is not in the file, or the live tier, is a bad flag value (18), not a
    # bad file (2)
    for argv in (("backup", "config", "--add-backend", "nosuch", "/mnt/c"),
                 ("backup", "config", "--add-backend", "primary", "/mnt/c"),
                 ("run", "--tier", "nosuch")):  # fmt: skip
        res = run_cli(*argv, home=home, check=18)
        assert b"nosuch" in res.stderr or b"takes no backends" in res.stderr, res.stderr
    assert strategy.load(f, home) == again  # a refused edit leaves the file alone
    dry = run_cli("run", "--dry-run", home=home).stdout.decode()
    assert "primary: skipped: the live database (docs/operations.md, Tiers)\n" in dry, dry


def test_add_backend_keeps_the_users_layout(tmp_path: Path) -> None:
    """A flow mapping over several lines keeps its lines (the round trip alone joins them),
    quoting and comments; only the values edited change."""
    home = tmp_path / "h"
    home.mkdir()
    (tmp_path / "n").mkdir()
    before = (
        "backup_strategy:\n"
        '  nas: {backend: "nas:vault", frequency: hourly}  # one copy\n'
        '  offsite: {backends: ["b2:kb", ":s3,provider=Wasabi,env_auth=true:kb",\n'
        '                       "/mnt/usb/kb"],\n'
        "            frequency: daily, erasure_coding: 2_of_3, retention: 1_year}\n"
        "  cold:\n"
        "    backends:\n"
        "      - 'x:1'  # first\n"
        "      - y:2\n"
        "    frequency: weekly\n"
        "    erasure_coding: 1_of_2\n"
        f"sources:\n  - path: {tmp_path / 'n'}\n"
    )
    f = write(home / "strategy.yaml", before)
    for tier, spec in (("offsite", "w:kb"), ("nas", "/mnt/b"), ("cold", "z:3")):
        run_cli("backup", "config", "--add-backend", tier, spec, home=home)
    assert f.read_text() == before.replace('"/mnt/usb/kb"],', '"/mnt/usb/kb", "w:kb"],').replace(
        "2_of_3", "2_of_4"
    ).replace(
        '{backend: "nas:vault",', '{backends: ["nas:vault", "/mnt/b"], erasure_coding: 1_of_2,'
    ).replace("      - y:2\n", '      - y:2\n      - "z:3"\n').replace("1_of_2\n", "1_of_3\n")
    s = strategy.load(f, home)
    assert s.tiers["offsite"].backends[-1] == "w:kb" and s.tiers["cold"].n == 3

    # a value edited that is itself over two lines: the round trip writes the file instead
    f.write_text(
        'backup_strategy:\n  nas: {backend: "nas:\n    vault", frequency: hourly}  # kept\n'
        f"sources:\n  - path: {tmp_path / 'n'}\n"
    )
    run_cli("backup", "config", "--add-backend", "nas", "/mnt/b", home=home)
    assert "  nas: {backends: ['nas: vault', /mnt/b]" in f.read_text().replace('"', "'")
    assert "# kept" in f.read_text()
    assert strategy.load(f, home).tiers["nas"].backends == ("nas: vault", "/mnt/b")


# -- tiers over simulated days -----------------------------------------------------------------
def at(home: Path, day: float, **extra: str) -> dict[str, str]:
    return vaultfs_env(home, VAULTFS_NOW=str(DAY0 + day * DAY), **extra)


def test_four_tiers_over_simulated_days_restore_and_share_one_seed(
    tmp_path: Path, s3_server, sftp_server, pg_server
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("# belief 1\n")
    pg_server.create_database("kb")
    pg_server.sql("CREATE TABLE beliefs (id int PRIMARY KEY, text text)", dbname="kb")
    nas_dir = tmp_path / "nas"
    usb = tmp_path / "usb"
    s3 = s3_server.remote("bucket/kb")
    sftp = sftp_server.remote("kb")
    archive = [tmp_path / f"arch{i}" for i in range(3)]
    f = write(
        home / "strategy.yaml",
        f"""\
backup_strategy:
  primary: {{backend: local_postgres, frequency: continuous}}
  nas: {{backend: "{nas_dir}", frequency: daily, retention: 3_days, erasure_coding: 1_of_1}}
  offsite:
    backends: ["{usb}", "{s3}", "{sftp}"]
    frequency: 2d
    erasure_coding: 2_of_3
    retention: 5_days
  archive:
    backends: [{", ".join(f'"{a}"' for a in archive)}]
    frequency: weekly
    erasure_coding: 2_of_3
    retention: permanent
sources:
  - path: {notes}
  - pg: {{dsn: "{pg_server.dsn("kb")}", pg_dump: "{pg_server.bin_dir / "pg_dump"}"}}
""",
    )
    assert strategy.load(f, home).tiers["offsite"].backends[1] == s3

    dry = json.loads(run_cli("run", "--dry-run", "--json", home=home, env=at(home, 0)).stdout)
    assert dry["tiers"]["primary"]["skipped"] and not (home / "tiers").exists()
    assert all(dry["tiers"][t]["due"] for t in ("nas", "offsite", "archive"))
    applied = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)
    assert applied == {
        "master_created": True,
        "made": dict.fromkeys(["nas", "offsite", "archive"], True),
        "differs": {},
    }
    again = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)
    assert again["made"] == dict.fromkeys(["nas", "offsite", "archive"], False)  # idempotent

    ran_on: dict[str, list[int]] = {"nas": [], "offsite": [], "archive": []}
    for day in range(10):
        if day == 9:  # a crashed pass's staging is dropped, never backed up
            (home / "staging").mkdir()
            (home / "staging" / "pg-stale.sql").write_text("stale\n")
            with open(home / "run.lock", "a") as lock:  # another pass runs: refused
                fcntl.flock(lock, fcntl.LOCK_EX)
                run_cli("run", home=home, env=at(home, day), check=17)
        (notes / "a.md").write_text(f"# belief 1, day {day}\n")
        pg_server.sql(f"INSERT INTO beliefs VALUES ({day}, 'day {day}')", dbname="kb")
        res = json.loads(run_cli("run", "--json", home=home, env=at(home, day)).stdout)
        for name, r in res["tiers"].items():
            assert "failed" not in r, (day, name, r)
            if r.get("ran"):
                ran_on[name].append(day)
                assert r["ran"]["audit"]["clean"]
    assert ran_on == {"nas": list(range(10)), "offsite": [0, 2, 4, 6, 8], "archive": [0, 7]}

    def snapshot_days(tier: str) -> list[int]:
        rows = json.loads(
            run_cli("snapshots", "--json", home=home / "tiers" / tier).stdout
        )  # fmt: skip
        return sorted(round((r["time"] - DAY0) / DAY) for r in rows)

    # keep-within of the newest: 3_days keeps days 7-9 (day 6 is exactly 3 days older: out)
    assert snapshot_days("nas") == [7, 8, 9]
    assert snapshot_days("offsite") == [4, 6, 8]
    assert snapshot_days("archive") == [0, 7]

    st = json.loads(run_cli("status", "--json", home=home, env=at(home, 9.5)).stdout)
    rows = {r["tier"]: r for r in st["tiers"]}
    assert rows["primary"]["live"]
    assert rows["nas"]["rpo_seconds"] == pytest.approx(DAY / 2)
    assert rows["offsite"]["next_due"] == DAY0 + 10 * DAY
    assert rows["offsite"]["survives_losses_design"] == rows["offsite"]["survives_losses_now"] == 1
    assert rows["nas"]["survives_losses_now"] == 0 and rows["archive"]["last_error"] is None

    # the NAS tier is 1-of-1 (erasure algorithm 3): one object per data segment, the
    # segment plus 85 bytes: the space of the data once, not twice
    assert json.loads(run_cli("status", "--json", home=home / "tiers" / "nas").stdout)["n"] == 1
    with contextlib.closing(sqlite3.connect(home / "tiers" / "nas" / "index.db")) as db:
        segs, size = db.execute(
            "SELECT count(*), sum(size) FROM segments WHERE kind='data'"
        ).fetchone()
    stored = [p.stat().st_size for p in (nas_dir / "data").iterdir()]
    assert len(stored) == segs and sum(stored) == size + 85 * segs

    # the restores on empty homes: the seeds come from the master key alone
    for tier, remotes, newest in (("nas", [str(nas_dir)], 9), ("offsite", [s3, sftp], 8)):
        seed = tmp_path / f"{tier}.seed"
        run_cli("strategy", "seed", tier, "--out", str(seed), home=home)
        empty = tmp_path / f"empty-{tier}"
        to = tmp_path / f"restored-{tier}"
        args = ["restore", "--to", str(to), "--seed-file", str(seed)]
        for r in remotes:
            args += ["--from", r]
        run_cli(*args, home=empty)
        assert (to / "notes" / "a.md").read_text() == f"# belief 1, day {newest}\n"
        dump = (to / "pg-kb.sql").read_text()
        assert f"{newest}\tday {newest}" in dump and f"{newest + 1}\tday" not in dump
        assert not (empty / "index.db").exists()
        assert sorted(p.name for p in to.iterdir()) == ["notes", "pg-kb.sql"]

    # one Shamir split of the master seed recovers every tier's key
    master = _master(home)
    split = json.loads(run_cli("keys", "split", "--shares", "5", "--threshold", "3", "--out-dir",
                               str(tmp_path / "shares"), "--json", home=home).stdout)  # fmt: skip
    assert split["fingerprint"] == master.fingerprint() and len(split["files"]) == 5
    files = [Path(p) for p in split["files"]]
    new_home = tmp_path / "new-home"
    args = ["keys", "recover", "--json"]
    for p in files[1:4]:
        args += ["--share-file", str(p)]
    run_cli(*args, home=new_home)
    for tier in ("nas", "offsite", "archive"):
        seed = tmp_path / f"recovered-{tier}.seed"
        run_cli("strategy", "seed", tier, "--out", str(seed), "--strategy", str(f), home=new_home)
        recovered = VaultKeys.from_seed(bytes.fromhex(seed.read_text().strip()))
        made = json.loads((home / "tiers" / tier / "key.json").read_text())["fingerprint"]
        assert recovered.fingerprint() == made
        assert recovered.seed == tier_seed(master.seed, tier)

    # the five drills against the tiers they are about: disk from the NAS alone, the rest
    # against the widest tier (offsite: a local dir, s3 and sftp), keys from the master's shares
    rep = json.loads(run_cli("drill", "all", "--json", "--strategy", str(f), home=home).stdout)
    assert rep["ok"], rep
    tiers_of = {d["scenario"]: d["details"]["tier"] for d in rep["drills"]}
    assert tiers_of == {"disk": "nas", "home": "offsite", "provider": "offsite",
                        "crypto": "offsite", "keys": "offsite"}  # fmt: skip
    keys_drill = next(d for d in rep["drills"] if d["scenario"] == "keys")
    assert keys_drill["details"]["master_fingerprint"] == master.fingerprint()
    assert all(d["identical"] for d in rep["drills"])
    res = run_cli("drill", "disk", "--tier", "primary", "--strategy", str(f), home=home, check=18)
    assert b"no tier 'primary' with backends" in res.stderr


def _master(home: Path) -> VaultKeys:
    return read_keyfile(home / "key.json", PASSPHRASE)


def test_init_makes_a_vault_from_an_existing_seed_or_its_shares(tmp_path: Path) -> None:
    master = VaultKeys.from_seed(bytes(range(32)))
    files = [
        write(tmp_path / f"s{i}.txt", shamir.share_file_text(master, w, 2, 3))
        for i, w in enumerate(shamir.split(master, 2, 3))
    ]
    seed_file = write(tmp_path / "seed.hex", master.seed.hex() + "\n")
    fps = []
    for i, extra in enumerate(
        (
            ["--seed-file", str(seed_file)],
            ["--share-file", str(files[0]), "--shares", str(files[2])],
        )
    ):
        res = run_cli("init", "-k", "1", "-n", "2", "--remote", str(tmp_path / f"r{i}"), "--json",
                      *extra, home=tmp_path / f"h{i}")  # fmt: skip
        fps.append(json.loads(res.stdout)["fingerprint"])
    assert fps == [master.fingerprint()] * 2
    run_cli("init", "-k", "1", "-n", "2", "--remote", str(tmp_path / "r9"), "--share-file",
            str(files[0]), home=tmp_path / "h9", check=19)  # fmt: skip


def test_an_immutable_tier_keeps_everything_and_a_torn_tier_home_is_named(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("a\n")
    write(
        home / "strategy.yaml",
        f"""\
backup_strategy:
  lock: {{backend: "{tmp_path / "l"}", frequency: daily, retention: 1_day, immutable: true}}
  torn: {{backend: "{tmp_path / "t"}", frequency: daily}}
sources:
  - path: {notes}
""",
    )
    run_cli("strategy", "apply", home=home)
    # a vault command in the strategy's home names the tiers' homes, not `vaultfs init`
    msg = run_cli("verify", home=home, check=16).stderr.decode()
    assert "is a strategy's home" in msg and f"{home / 'tiers'}/NAME" in msg, msg
    assert "lock, torn" in msg and "vaultfs init" not in msg
    run_cli("backup", "config", "--add-backend", "lock", str(tmp_path / "l2"), home=home)
    differs = json.loads(run_cli("strategy", "apply", "--json", home=home).stdout)["differs"]
    assert differs == {"lock": [f"{tmp_path / 'l2'} is in the file, not a remote of the vault: "
                                f"`vaultfs remote add --home {home / 'tiers' / 'lock'} "
                                f"{tmp_path / 'l2'}`"]}  # fmt: skip
    (home / "tiers" / "torn" / "index.db").unlink()  # as if made up to its keyfile only
    for day in range(3):
        res = json.loads(run_cli("run", "--json", home=home, env=at(home, day), check=20).stdout)
        assert res["tiers"]["lock"]["ran"]["retention"].startswith("skipped: an immutable tier")
        assert "keyfile but no index" in res["tiers"]["torn"]["failed"]
    rows = json.loads(run_cli("snapshots", "--json", home=home / "tiers" / "lock").stdout)
    assert len(rows) == 3
    # the tier's vault itself is append-only, not only skipped by the routine
    lock_home = home / "tiers" / "lock"
    assert json.loads(run_cli("status", "--json", home=lock_home).stdout)["immutable"] is True
    assert len(list((tmp_path / "l" / "manifests").iterdir())) == 3  # every index copy kept
    run_cli("prune", home=lock_home, check=23)
    st = json.loads(run_cli("status", "--json", home=home, env=at(home, 2.5)).stdout)
    lock, torn = st["tiers"]
    assert lock["last_error"] is None and lock["rpo_seconds"] == DAY / 2
    assert torn["last_success"] is None and "keyfile but no index" in torn["last_error"]
    assert "torn" in run_cli("status", home=home).stdout.decode()  # the table prints
