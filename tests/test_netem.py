"""The network emulation (bench/netem.py) the benchmark's net section and the hedging tests
stand on: remotes behind emulated links carry a vault, and nothing is left behind.

Nothing here asserts on wall time (performance belongs to scripts/bench): the tests check
that the links carry data and that the emulation tears itself down.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import run_cli, tree_digest

from bench.netem import Link, Network, has_netns

pytestmark = [pytest.mark.network]

FAST = Link(rtt=0.004, rate_bps=400e6)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_vault_over_emulated_links_round_trips(tmp_path, emulated_network):
    net = emulated_network([FAST] * 3)
    specs = [r.spec("bkt/vault") for r in net.remotes]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3_000_000))
    (src / "b.txt").write_text("hello over a link\n" * 1000)
    home = tmp_path / "home"
    init = ["init", "-k", "2", "-n", "3"]
    for s in specs:
        init += ["--remote", s]
    run_cli(*init, home=home)
    run_cli("backup", str(src), home=home)
    # the shards went through the servers behind the links
    for r in net.remotes:
        assert any((r.root / "bkt" / "vault" / "data").iterdir())
    empty = tmp_path / "empty-home"
    empty.mkdir()
    out = tmp_path / "out"
    restore = ["restore", "--to", str(out), "--keyfile", str(home / "key.json")]
    for s in specs[1:]:
        restore += ["--from", s]
    run_cli(*restore, home=empty)
    assert tree_digest(out / "src") == tree_digest(src)


@pytest.mark.skipif(not has_netns(), reason="needs root with ip and tc (namespace mode)")
def test_namespace_is_torn_down(tmp_path):
    net = Network(tmp_path / "net", [FAST, FAST], ttl=300)
    other = Network(tmp_path / "other", [FAST], ttl=300)  # side by side: own names, own block
    assert net.mode == "netns"
    assert net.ns in _namespaces() and other.ns in _namespaces()
    assert net.subnet_a != other.subnet_a
    net.set_link(1, Link(rtt=0.1, rate_bps=10e6))  # reshaped and relayed on the same port
    assert net.remotes[1].port
    net.close()
    assert net.ns not in _namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"vn{net.tag}h" not in links and f"vn{other.tag}h" in links
    assert all(r.proc is not None and r.proc.poll() is not None for r in net.remotes)
    # the other network still carries data
    from vaultfs.remotes import rclone_binary

    blob = tmp_path / "blob"
    blob.write_bytes(b"still here")
    spec = other.remotes[0].spec("bkt/x")
    subprocess.run([rclone_binary(), "-q", "copyto", str(blob), spec + "/blob"], check=True)
    assert (other.remotes[0].root / "bkt" / "x" / "blob").read_bytes() == b"still here"
    other.close()
    assert other.ns not in _namespaces()


def test_loopback_fallback_carries_data(tmp_path):
    with Network(tmp_path / "net", [FAST], ttl=300, force_loopback=True) as net:
        assert net.mode == "loopback"
        spec = net.remotes[0].spec("bkt/x")
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(200_000))
        from vaultfs.remotes import rclone_binary

        rc = rclone_binary()
        subprocess.run([rc, "-q", "copyto", str(blob), spec + "/blob"], check=True)
        back = tmp_path / "back"
        subprocess.run([rc, "-q", "copyto", spec + "/blob", str(back)], check=True)
        assert back.read_bytes() == blob.read_bytes()
        assert (net.remotes[0].root / "bkt" / "x" / "blob").exists()
