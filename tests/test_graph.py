"""`vaultfs graph show|add-edge|path|stats` against a small hand-built belief graph with known
paths (a cycle, a disconnected pair, an orphan), and every bad input a user can give."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import PgServer, run_cli

from vaultfs.errors import InputError
from vaultfs.kb import db, graph
from vaultfs.kb.schema import ddl

pytestmark = pytest.mark.pg

NAMES = "A B C D E G H O".split()
IDS = {n: uuid.uuid5(uuid.NAMESPACE_URL, f"test-graph/{n}") for n in NAMES}
# A→B→C→D→A is a cycle; A-contradicts->D is the one-hop shortcut; G→H is apart; O is alone.
EDGES = [
    ("A", "B", "supports", 0.9),
    ("B", "C", "supports", 0.8),
    ("C", "D", "derives_from", 0.7),
    ("A", "D", "contradicts", 0.4),
    ("D", "A", "supports", 0.6),
    ("E", "C", "supersedes", 1.0),
    ("G", "H", "supports", 0.5),
]


@pytest.fixture(scope="module")
def kb(pg_server: PgServer) -> Iterator[str]:
    dsn = pg_server.create_database("graphtest")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl(dim=4))
        for i, n in enumerate(NAMES):
            conn.execute(
                "INSERT INTO beliefs (id, content, embedding, confidence, domains, created_at) "
                "VALUES (%s, %s, %s, 0.5, %s, now())",
                (IDS[n], f"belief {n}", f"[{i},1,0,0]", ["test"]),
            )
        for i, (a, b, t, w) in enumerate(EDGES):
            conn.execute(
                "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type, "
                "weight, created_at) VALUES (%s, %s, %s, %s, %s, now())",
                (uuid.UUID(int=i + 1), IDS[a], IDS[b], t, w),
            )
    yield dsn
    pg_server.drop_database("graphtest")


@pytest.fixture
def conn(kb: str) -> Iterator[psycopg.Connection]:
    c = db.connect(kb, autocommit=True)
    try:
        yield c
    finally:
        c.close()


def _names(ids: list[str]) -> list[str]:
    back = {str(v): k for k, v in IDS.items()}
    return [back[i] for i in ids]


def test_path_shortest_typed_and_bounded(conn: psycopg.Connection) -> None:
    a, d = IDS["A"], IDS["D"]
    res = graph.find_path(conn, a, d)
    assert res["found"] and res["engine"] == "cte"
    assert _names(res["nodes"]) == ["A", "D"] and res["hops"][0]["edge_type"] == "contradicts"
    res = graph.find_path(conn, a, d, types=["supports", "derives_from"])
    assert _names(res["nodes"]) == ["A", "B", "C", "D"]
    assert [h["weight"] for h in res["hops"]] == pytest.approx([0.9, 0.8, 0.7])
    assert not graph.find_path(conn, a, d, max_depth=2, types=["supports", "derives_from"])["found"]
    assert not graph.find_path(conn, a, d, types=["supports"])["found"]
    # through the cycle: D→A→B, never looping
    assert _names(graph.find_path(conn, IDS["D"], IDS["B"])["nodes"]) == ["D", "A", "B"]
    # the disconnected pair and direction
    assert not graph.find_path(conn, a, IDS["H"], max_depth=12)["found"]
    assert not graph.find_path(conn, IDS["H"], IDS["G"])["found"]
    back = graph.find_path(conn, IDS["H"], IDS["G"], undirected=True)
    assert back["found"] and back["hops"][0]["direction"] == "in"
    # E reaches D only along supersedes then derives_from
    res = graph.find_path(conn, IDS["E"], IDS["D"], types=["supersedes", "derives_from"])
    assert _names(res["nodes"]) == ["E", "C", "D"]


def test_show_and_stats(conn: psycopg.Connection) -> None:
    view = graph.show(conn, IDS["A"])
    assert [e["belief"] for e in view["out"]["supports"]] == [str(IDS["B"])]
    assert view["out"]["contradicts"][0]["weight"] == pytest.approx(0.4)
    assert [e["belief"] for e in view["in"]["supports"]] == [str(IDS["D"])]
    assert view["in"]["derives_from"] == []
    st = graph.stats(conn)
    assert st["beliefs"] == len(NAMES) and st["edges"] == len(EDGES)
    assert st["by_type"]["supports"]["count"] == 4 and st["by_type"]["supersedes"]["count"] == 1
    assert st["orphans"] == 1 and st["dangling_edges"] == 0 and st["self_loops"] == 0
    assert st["degree"]["min"] == 0 and st["degree"]["max"] == 3


def test_add_edge_validation(conn: psycopg.Connection) -> None:
    o, g = IDS["O"], IDS["G"]
    bad = [
        (lambda: graph.add_edge(conn, o, o, "supports"), "itself"),
        (lambda: graph.add_edge(conn, o, g, "refutes"), "unknown edge type"),
        (lambda: graph.add_edge(conn, o, g, "supports", 1.5), "outside [0, 1]"),
        (lambda: graph.add_edge(conn, o, uuid.UUID(int=7), "supports"), "no belief with id"),
        (lambda: graph.add_edge(conn, IDS["A"], IDS["B"], "supports"), "already exists"),
        (lambda: graph.parse_id("not-a-uuid"), "is not a belief id"),
        (lambda: graph.find_path(conn, o, g, max_depth=0), "--max-depth"),
        (lambda: graph.find_path(conn, o, g, types=["likes"]), "unknown edge type"),
    ]
    before = graph.stats(conn)["edges"]
    for call, msg in bad:
        with pytest.raises(InputError, match=msg.replace("[", r"\[")):
            call()
    assert graph.stats(conn)["edges"] == before


def test_cli(kb: str, tmp_path: Path, conn: psycopg.Connection) -> None:
    def cli(*args: str, check: int = 0) -> dict | str:
        proc = run_cli("graph", *args, home=tmp_path / "home", check=check, env=None)
        if check:
            stderr = proc.stderr.decode()
            assert "Traceback" not in stderr and "error:" in stderr
            return stderr
        return json.loads(proc.stdout) if "--json" in args else proc.stdout.decode()

    a, b, o, g = (str(IDS[n]) for n in "ABOG")
    view = cli("show", a, "--dsn", kb, "--json")
    assert isinstance(view, dict) and view["out"]["supports"][0]["belief"] == b
    assert "supports" in str(cli("show", a, "--dsn", kb))
    res = cli("path", a, str(IDS["D"]), "--type", "supports", "-t", "derives_from", "--dsn", kb, "--json")  # fmt: skip
    assert isinstance(res, dict) and res["length"] == 3
    assert "no path" in str(cli("path", a, str(IDS["H"]), "--dsn", kb, "--max-depth", "3"))
    edge = cli("add-edge", o, g, "--type", "derives_from", "--weight", "0.25", "--dsn", kb, "--json")  # fmt: skip
    assert isinstance(edge, dict) and edge["weight"] == 0.25
    st = cli("stats", "--dsn", kb, "--json")
    assert isinstance(st, dict) and st["orphans"] == 0 and st["edges"] == len(EDGES) + 1
    assert "orphans" in str(cli("stats", "--dsn", kb))
    # every bad input: one sentence on stderr, exit 18, never a traceback
    assert "not a belief id" in str(cli("show", "xyz", "--dsn", kb, check=18))
    assert "no belief with id" in str(cli("show", str(uuid.UUID(int=9)), "--dsn", kb, check=18))
    assert "unknown edge type" in str(cli("add-edge", o, g, "--type", "likes", "--dsn", kb, check=18))  # fmt: skip
    assert "already exists" in str(cli("add-edge", o, g, "--type", "derives_from", "--dsn", kb, check=18))  # fmt: skip
    assert "unknown edge type" in str(cli("path", a, b, "--type", "x", "--dsn", kb, check=18))
    down = "postgresql://nobody:hunter2@127.0.0.1:1/none"
    msg = str(cli("stats", "--dsn", down, check=18))
    assert "cannot connect" in msg and "hunter2" not in msg
    assert "malformed DSN" in str(cli("stats", "--dsn", "host=x bogus", check=18))
    nodb = kb.replace("graphtest", "postgres")
    assert "no belief schema" in str(cli("stats", "--dsn", nodb, check=18))
    # $VAULTFS_DSN is the default
    env_run = run_cli(
        "graph", "stats", "--json", home=tmp_path / "home",
        env={**os.environ, "VAULTFS_DSN": kb},
    )  # fmt: skip
    assert json.loads(env_run.stdout)["beliefs"] == len(NAMES)
    conn.execute("DELETE FROM belief_edges WHERE metadata->>'added_by' = 'vaultfs graph add-edge'")


def test_cypher_query_text_is_validated() -> None:
    q = graph.cypher_path_query(IDS["A"], IDS["B"], 4, ["supports"], False)
    assert "[*1..4]->" in q and "label(r) IN ['supports']" in q
    with pytest.raises(InputError):
        graph.cypher_path_query(IDS["A"], IDS["B"], 4, ["x'}) DETACH DELETE n //"], False)
