"""Issue 13's knowledge-base benchmark: graph-aware snapshots against plain ``pg_dump``.

A live database is needed (not the cached dumps): the section fills an embedded Postgres
with make_kb.py (``--beliefs``, ``--seed``) and then, per repeat, over a fresh 3-of-5 vault
on five local-directory remotes (default 4 MiB segments):

1. ``vaultfs kb snapshot --dsn DSN`` against ``pg_dump -Fp`` of the same database (each a
   whole command as a user runs it; the snapshot includes unlocking the key and placing every
   shard on the remotes); target ≤ 1.5× the dump's time;
2. the dataset's 1% change (bench/dataset.py ``CHANGE_SQL``: the first 1% of the beliefs by
   id revised), then ``vaultfs kb snapshot`` again: bytes newly stored per copy of the data
   (growth of the five remote directories × k/n) against the size of the dump; target ≤ 3%;
3. ``vaultfs kb restore latest --from r1 --from r3 --from r5 --keyfile K`` with an empty home
   into a fresh database, against ``psql -f`` of the dump into another one; target ≤ 1.5×;
   both restored databases must match the source (row counts and checksums);
4. ``vaultfs kb show ID`` of one belief from a cold home (the same three remotes): bytes read
   from the remotes and time (information).

The change is undone by rebuilding the database before the next repeat.
"""

from __future__ import annotations

import json
import shutil

from ..context import Context
from ..dataset import CHANGE_SQL
from ..harness import MB, BenchError, Metric, SectionResult, median, run, section, tree_bytes
from ..pg import PgServer

K, N = 3, 5
PASSPHRASE = "vaultfs-bench-passphrase"
SNAPSHOT_LIMIT = 1.5
NEW_BYTES_LIMIT = 0.03
RESTORE_LIMIT = 1.5


def _mb(n: float) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.2f} MB"


@section("kb", "issue 13: kb snapshot / 1% change / kb restore vs pg_dump and psql, kb show")
def kb(ctx: Context) -> SectionResult:
    res = SectionResult()
    snap_r, new_frac, restore_r = [], [], []
    shows: list[dict] = []
    same: list[bool] = []
    with PgServer() as pg:
        for i in range(ctx.repeats):
            root = ctx.scratch(f"kb-{i}")
            ctx.log(f"run {i + 1}/{ctx.repeats}: {ctx.beliefs:,}-belief database")
            pg.make_kb("kb", ctx.beliefs, ctx.seed)
            dsn = pg.dsn("kb")
            source = pg.table_checksums("kb")
            home = root / "home"
            remotes = [root / f"remote{j}" for j in range(1, N + 1)]
            env = ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(home))
            cmd = [*ctx.vaultfs, "init", "-k", str(K), "-n", str(N)]
            for r in remotes:
                cmd += ["--remote", str(r)]
            run(cmd, env=env)

            dump = root / "kb.sql"
            pg_dump = [str(pg.bin_dir / "pg_dump"), "-Fp", "-f", str(dump), "-d", dsn]
            snap_cmd = [*ctx.vaultfs, "kb", "snapshot", "--json", "--dsn", dsn]
            first = [("pg_dump", pg_dump, ctx.env()), ("kb snapshot", snap_cmd, env)]
            times = {}
            for name, c, e in first if i % 2 == 0 else reversed(first):
                ctx.log(f"run {i + 1}/{ctx.repeats}: {name}")
                times[name] = run(c, env=e)
            info = json.loads(times["kb snapshot"].stdout)
            if not info.get("complete"):
                raise BenchError(f"kb snapshot left shards queued: {info}")
            dump_size = dump.stat().st_size
            snap_r.append(times["kb snapshot"].seconds / times["pg_dump"].seconds)

            before = tree_bytes(*remotes)
            pg.sql(CHANGE_SQL.format(count=max(1, ctx.beliefs // 100)), "kb")
            ctx.log(f"run {i + 1}/{ctx.repeats}: kb snapshot after the 1% change")
            changed = run(snap_cmd, env=env)
            added = (tree_bytes(*remotes) - before) * K // N
            new_frac.append(added / dump_size)
            changed_source = pg.table_checksums("kb")

            keyfile = root / "key.json"
            shutil.copy(home / "key.json", keyfile)
            cold = root / "cold-home"
            cold.mkdir()
            cold_env = ctx.env(VAULTFS_PASSPHRASE=PASSPHRASE, VAULTFS_HOME=str(cold))
            from_args = [
                a for r in (remotes[0], remotes[2], remotes[4]) for a in ("--from", str(r))
            ]
            pg.create_database("kb_restored")
            pg.create_database("kb_psql")
            restore_cmd = [*ctx.vaultfs, "kb", "restore", "latest", "--json", "--dsn"]
            restore_cmd += [pg.dsn("kb_restored"), *from_args, "--keyfile", str(keyfile)]
            psql = [str(pg.bin_dir / "psql"), "-q", "-X", "-v", "ON_ERROR_STOP=1"]
            psql += ["-d", pg.dsn("kb_psql"), "-f", str(dump)]
            second = [("psql", psql, ctx.env()), ("kb restore", restore_cmd, cold_env)]
            for name, c, e in second if i % 2 == 0 else reversed(second):
                ctx.log(f"run {i + 1}/{ctx.repeats}: {name}")
                times[name] = run(c, env=e)
            restore_r.append(times["kb restore"].seconds / times["psql"].seconds)
            same.append(
                pg.table_checksums("kb_restored") == changed_source
                and pg.table_checksums("kb_psql") == source
            )

            (bid,) = pg.sql("SELECT id::text FROM beliefs ORDER BY id OFFSET %s LIMIT 1", "kb", (ctx.beliefs // 2,))[0]  # fmt: skip
            shutil.rmtree(cold)
            cold.mkdir()
            ctx.log(f"run {i + 1}/{ctx.repeats}: kb show from a cold home")
            show = run([*ctx.vaultfs, "kb", "show", bid, "--json", *from_args, "--keyfile", str(keyfile)], env=cold_env)  # fmt: skip
            doc = json.loads(show.stdout)
            stored = tree_bytes(remotes[0], remotes[2], remotes[4])
            shows.append(
                {"bytes_read": doc["bytes_read"], "stored": stored, "seconds": show.seconds}
            )
            res.details[f"run_{i}"] = {
                "dump_bytes": dump_size,
                "snapshot_bytes": info["bytes"],
                "new_bytes_after_change": added,
                "changed_snapshot_seconds": changed.seconds,
                **{f"{k}_seconds": m.seconds for k, m in times.items()},
                **{f"{k}_cpu": m.cpu_seconds for k, m in times.items()},
                "show": shows[-1],
            }
            for db in ("kb_restored", "kb_psql"):
                pg.drop_database(db)
            shutil.rmtree(root, ignore_errors=True)

    d = [res.details[f"run_{i}"] for i in range(ctx.repeats)]
    res.metrics += [
        Metric(
            "kb snapshot time vs pg_dump -Fp",
            median(snap_r),
            "x",
            ("<=", SNAPSHOT_LIMIT),
            ours=f"{median([x['kb snapshot_seconds'] for x in d]):.2f}s",
            peer=f"{median([x['pg_dump_seconds'] for x in d]):.2f}s",
            note="whole commands: the snapshot unlocks the key and places every shard",
        ),
        Metric(
            "new bytes after 1% change, per copy / dump",
            median(new_frac) * 100,
            "%",
            ("<=", NEW_BYTES_LIMIT * 100),
            ours=_mb(median([x["new_bytes_after_change"] for x in d])),
            peer=_mb(median([x["dump_bytes"] for x in d])) + " dump",
        ),
        Metric(
            "kb restore (3 of 5, no local state) vs psql -f dump",
            median(restore_r),
            "x",
            ("<=", RESTORE_LIMIT),
            ours=f"{median([x['kb restore_seconds'] for x in d]):.2f}s",
            peer=f"{median([x['psql_seconds'] for x in d]):.2f}s",
        ),
        Metric("restored databases match their sources", all(same), "", ("==", True)),
        Metric(
            "kb show from a cold home: bytes read / stored on 3 remotes",
            median([s["bytes_read"] / s["stored"] for s in shows]) * 100,
            "%",
            None,
            ours=f"{_mb(median([s['bytes_read'] for s in shows]))} in "
            f"{median([s['seconds'] for s in shows]):.2f}s",
            peer=_mb(median([s["stored"] for s in shows])),
        ),
    ]
    return res
