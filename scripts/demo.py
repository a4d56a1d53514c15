"""The vaultfs demo (run it through ./scripts/demo, which installs what is needed first)."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vaultfs.pgembed import EmbeddedPostgres  # noqa: E402

MAKE_KB = REPO.parent / "shared" / "datasets" / "make_kb.py"
console = Console(soft_wrap=True)


def step(text: str) -> None:
    console.print(f"\n[bold cyan]▶ {text}[/]")


def vaultfs(*args: str, env: dict[str, str], stdin=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cli.main", *args]
    console.print(f"  [dim]$ vaultfs {' '.join(args)}[/]")
    # tables as wide as the demo's own terminal (output is captured, so rich would use 80)
    env = dict(env, COLUMNS=str(max(120, shutil.get_terminal_size().columns - 4)))
    proc = subprocess.run(cmd, env=env, stdin=stdin, cwd=REPO, text=True, capture_output=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        console.print(f"    {line}", highlight=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: vaultfs {args[0]} exited {proc.returncode}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--beliefs", type=int, default=int(os.environ.get("DEMO_BELIEFS", 20000)))
    ap.add_argument("--keep", action="store_true", help="keep the demo directory")
    a = ap.parse_args()
    if not MAKE_KB.exists():
        raise SystemExit(f"the dataset generator is missing: {MAKE_KB}")

    work = Path(tempfile.mkdtemp(prefix="vaultfs-demo-"))
    remotes = [work / "remotes" / f"provider{i}" for i in range(1, 6)]
    home = work / "laptop" / "vaultfs-home"
    env = dict(os.environ, VAULTFS_HOME=str(home), VAULTFS_PASSPHRASE="demo passphrase")
    console.print(f"[bold]vaultfs demo[/] in {work}")
    pg = EmbeddedPostgres(work / "postgres")
    try:
        step(f"Build a knowledge base of {a.beliefs:,} beliefs in embedded Postgres (pgvector)")
        t = time.perf_counter()
        pg.make_kb(MAKE_KB, "kb", a.beliefs)
        source = pg.table_checksums("kb")
        for table, (rows, _md5) in source.items():
            console.print(f"    {table}: {rows:,} rows")
        console.print(f"    built in {time.perf_counter() - t:.1f}s")

        step("Create a 3-of-5 vault over five local-directory remotes")
        args = ["init", "--profile", "personal"]
        for r in remotes:
            args += ["--remote", str(r)]
        vaultfs(*args, env=env)

        step("pg_dump straight into the vault: pg_dump | vaultfs backup --stdin")
        dump = work / "kb-original.sql"
        pg.pg_dump("kb", dump)
        console.print(f"    dump: {dump.stat().st_size:,} bytes")
        with open(dump, "rb") as f:
            vaultfs("backup", "--stdin", "--stdin-filename", "dumps/kb.sql", env=env, stdin=f)
        vaultfs("status", env=env)

        step("Mount the vault and run pg_dump straight into it, then take a snapshot")
        mnt = work / "mnt"
        mnt.mkdir()
        vaultfs("mount", str(mnt), env=env)
        try:
            (mnt / "dumps").mkdir()
            t = time.perf_counter()
            pg.pg_dump("kb", mnt / "dumps" / "kb-mounted.sql")
            took = time.perf_counter() - t
            size = (mnt / "dumps" / "kb-mounted.sql").stat().st_size
            written = hashlib.sha256((mnt / "dumps" / "kb-mounted.sql").read_bytes()).hexdigest()
            console.print(
                f"    $ pg_dump -f {mnt}/dumps/kb-mounted.sql: {size:,} bytes in {took:.1f}s"
            )
            vaultfs("snapshot", "--name", "nightly", env=env)
            console.print(f"    $ ls {mnt}/.snapshots/: {sorted(os.listdir(mnt / '.snapshots'))}")
            console.print(
                f"    $ ls {mnt}/.snapshots/nightly/dumps/: "
                f"{sorted(os.listdir(mnt / '.snapshots' / 'nightly' / 'dumps'))}"
            )
        finally:
            vaultfs("umount", str(mnt), env=env)

        step("Disaster: two providers vanish and the laptop is lost (keyfile kept offline)")
        offline_key = work / "usb-stick" / "key.json"
        offline_key.parent.mkdir()
        shutil.copy(home / "key.json", offline_key)
        for gone in (remotes[1], remotes[3]):
            shutil.rmtree(gone)
            console.print(f"    deleted {gone}")
        shutil.rmtree(work / "laptop")
        console.print(f"    deleted {home} (index, queue, keyfile)")

        step("Restore on an empty machine from the three surviving remotes + keyfile")
        new_home = work / "new-laptop" / "vaultfs-home"
        env2 = dict(env, VAULTFS_HOME=str(new_home))
        out = work / "restored"
        survivors = [remotes[0], remotes[2], remotes[4]]
        args = ["restore", "--to", str(out), "--keyfile", str(offline_key), "--snapshot", "nightly"]
        for r in survivors:
            args += ["--from", str(r)]
        vaultfs(*args, env=env2)

        step("Prove it")
        restored = out / "dumps" / "kb-mounted.sql"  # written through the mount
        same = hashlib.sha256(restored.read_bytes()).hexdigest() == written
        console.print(
            f"    restored dump byte-identical to what pg_dump wrote into the mount: [bold]{same}[/]"
        )
        pg.create_database("kb_restored")
        pg.psql_file("kb_restored", restored)
        again = pg.table_checksums("kb_restored")
        for table in source:
            ok = again[table] == source[table]
            console.print(f"    {table}: rows {again[table][0]:,}, checksum match: {ok}")
        if not same or again != source:
            raise SystemExit("demo failed: the restore differs from the source")
        console.print(
            "\n[bold green]✔ the knowledge base survived losing 2 of 5 remotes and the laptop[/]"
        )
    finally:
        pg.stop()
        if a.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
