"""The shared fixtures themselves work: rclone S3/SFTP servers and embedded Postgres."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import port_open


def _rclone(rclone_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(rclone_bin), *args], capture_output=True, text=True, check=True, timeout=60
    )


@pytest.mark.network
def test_s3_server_roundtrip_and_outage(s3_server, rclone_bin, tmp_path):
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello s3\n")
    remote = s3_server.remote("bucket1/dir/hello.txt")
    _rclone(rclone_bin, "copyto", str(src), remote)
    assert _rclone(rclone_bin, "cat", remote).stdout == "hello s3\n"
    assert (s3_server.root / "bucket1" / "dir" / "hello.txt").read_bytes() == b"hello s3\n"

    s3_server.stop()
    assert not port_open(s3_server.host, s3_server.port)
    failed = subprocess.run(
        [str(rclone_bin), "cat", "--retries", "1", "--low-level-retries", "1", remote],
        capture_output=True,
        timeout=60,
    )
    assert failed.returncode != 0

    s3_server.start()
    assert _rclone(rclone_bin, "cat", remote).stdout == "hello s3\n"


@pytest.mark.network
def test_s3_server_factory_gives_independent_servers(s3_server_factory):
    a, b = s3_server_factory(), s3_server_factory()
    assert a.port != b.port and a.root != b.root
    assert a.running and b.running


@pytest.mark.network
def test_sftp_server_roundtrip(sftp_server, rclone_bin, tmp_path):
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello sftp\n")
    remote = sftp_server.remote("vault/hello.txt")
    _rclone(rclone_bin, "copyto", str(src), remote)
    assert _rclone(rclone_bin, "cat", remote).stdout == "hello sftp\n"
    assert _rclone(rclone_bin, "lsf", sftp_server.remote("vault")).stdout == "hello.txt\n"
    assert (sftp_server.root / "vault" / "hello.txt").exists()


@pytest.mark.pg
def test_pg_server_make_kb_dump_and_checksums(pg_server, tmp_path):
    for tool in ("pg_dump", "psql", "pg_restore"):
        assert (pg_server.bin_dir / tool).exists()
    pg_server.make_kb(200, seed=7, dbname="kb_fixture")
    sums = pg_server.table_checksums("kb_fixture")
    assert set(sums) == {"sources", "beliefs", "belief_edges"}
    assert sums["beliefs"][0] == 200
    assert all(count > 0 and md5 for count, md5 in sums.values())

    dump = pg_server.pg_dump("kb_fixture", tmp_path / "kb.sql")
    assert "CREATE TABLE public.beliefs" in dump.read_text()

    # The plain dump restores into a fresh database with identical contents.
    pg_server.create_database("kb_fixture_restored")
    pg_server.psql_file("kb_fixture_restored", dump)
    assert pg_server.table_checksums("kb_fixture_restored") == sums
