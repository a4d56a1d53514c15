"""The knowledge base in the vault (docs/kb.md): `vaultfs kb snapshot|restore|show|history|diff`
against the embedded Postgres with pgvector, over a real vault on local-directory remotes."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
from helpers import init_local_vault, run_cli

from vaultfs.kb import layout, schema

pytestmark = pytest.mark.pg

EMB_MD5 = "SELECT md5(string_agg(vector_send(embedding), ''::bytea ORDER BY id)) FROM beliefs"
ORPHANS = (
    "SELECT count(*) FROM belief_edges e WHERE NOT EXISTS (SELECT 1 FROM beliefs b WHERE"
    " b.id = e.source_belief_id) OR NOT EXISTS (SELECT 1 FROM beliefs b WHERE"
    " b.id = e.target_belief_id)"
)


def init_vault(root: Path, n_remotes: int = 5) -> tuple[Path, list[str]]:
    vault = init_local_vault(root, 3, 5, remotes=n_remotes, prefix="remote")
    return vault.home, vault.specs


def cli_json(*args: str, home: Path) -> dict:
    return json.loads(run_cli(*args, "--json", home=home).stdout)


def fails(code: int, *args: str, home: Path) -> str:
    """Run a command that must fail with ``code``; its stderr (never a traceback)."""
    p = run_cli(*args, home=home, check=code)
    stderr = p.stderr.decode()
    assert "Traceback" not in stderr and stderr.strip(), stderr
    return stderr


def remote_bytes(remotes: list[str]) -> int:
    return sum(f.stat().st_size for r in remotes for f in Path(r).rglob("*") if f.is_file())


def ids(pg, sql: str, db: str) -> set[str]:
    return {str(r[0]) for r in pg.sql(sql, db) or []}


# -- the main job: 20,000 beliefs, a disaster, a restore into a fresh database ---------------
@pytest.mark.slow
def test_snapshot_disaster_restore_20k_and_cold_show(tmp_path, pg_server):
    dsn = pg_server.make_kb(20000, seed=5, dbname="kb20k")
    source = pg_server.table_checksums("kb20k")
    home, remotes = init_vault(tmp_path)
    snap = cli_json("kb", "snapshot", "--dsn", dsn, "--name", "first", home=home)
    assert snap["complete"] and snap["survives_losses_now"] == 2
    tables = snap["kb"]["tables"]
    assert {t: v["rows"] for t, v in tables.items()} == {t: n for t, (n, _md5) in source.items()}
    assert len(snap["kb"]["root"]) == 64
    paths = {e["path"] for e in cli_json("ls", "first", home=home)}
    assert {"kb/manifest.json", "kb/sources.jsonl", "kb/beliefs/00.jsonl"} <= paths
    assert {"kb/embeddings/ff.bin", "kb/edges/out/7f.jsonl", "kb/edges/in/a0.jsonl"} <= paths

    keyfile = tmp_path / "usb" / "key.json"
    keyfile.parent.mkdir()
    shutil.copy(home / "key.json", keyfile)
    shutil.rmtree(home)
    shutil.rmtree(remotes[1])
    shutil.rmtree(remotes[3])
    left = [remotes[0], remotes[2], remotes[4]]
    remote_args = [a for r in left for a in ("--from", r)]
    pg_server.create_database("kb20k_restored")
    rep = cli_json(
        "kb", "restore", "first", "--dsn", pg_server.dsn("kb20k_restored"), *remote_args,
        "--keyfile", str(keyfile), home=tmp_path / "new-machine",
    )  # fmt: skip
    assert rep["restored"] == {t: n for t, (n, _md5) in source.items()}
    assert rep["quarantined"] == [] and rep["orphan_edges_after"] == 0
    assert pg_server.table_checksums("kb20k_restored") == source
    assert pg_server.sql(EMB_MD5, "kb20k_restored") == pg_server.sql(EMB_MD5, "kb20k")
    assert pg_server.sql(ORPHANS, "kb20k_restored") == [(0,)]

    # one belief from a cold home: a small fraction of what the remotes hold is read
    bid, content, conf = pg_server.sql(
        "SELECT id::text, content, confidence FROM beliefs ORDER BY id OFFSET 12345 LIMIT 1",
        "kb20k",
    )[0]
    doc = cli_json(
        "kb", "show", bid, *remote_args, "--keyfile", str(keyfile), home=tmp_path / "cold"
    )
    assert (doc["id"], doc["content"], doc["confidence"]) == (bid, content, pytest.approx(conf))
    out = ids(pg_server, f"SELECT id FROM belief_edges WHERE source_belief_id = '{bid}'", "kb20k")
    inc = ids(pg_server, f"SELECT id FROM belief_edges WHERE target_belief_id = '{bid}'", "kb20k")
    assert {e["id"] for e in doc["edges"]["out"]} == out
    assert {e["id"] for e in doc["edges"]["in"]} == inc
    total = remote_bytes(left)
    assert 0 < doc["bytes_read"] < 0.1 * total, (doc["bytes_read"], total)


# -- a small graph shared by the partial-restore and bad-input tests ------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory, pg_server):
    root = tmp_path_factory.mktemp("kb-small")
    dsn = pg_server.make_kb(1500, seed=3, dbname="kb_small")
    home, remotes = init_vault(root)
    snap = cli_json("kb", "snapshot", "--dsn", dsn, "--name", "small", home=home)
    return root, home, dsn, snap["snapshot"]


def _reach(pg, db: str, start: str, depth: int) -> tuple[set[str], list[tuple[str, str, str]]]:
    edges = [(str(i), str(s), str(t)) for i, s, t in pg.sql("SELECT id, source_belief_id, target_belief_id FROM belief_edges", db)]  # fmt: skip
    adj = defaultdict(set)
    for _i, s, t in edges:
        adj[s].add(t)
        adj[t].add(s)
    reach, frontier = {start}, {start}
    for _ in range(depth):
        frontier = {n for f in frontier for n in adj[f]} - reach
        reach |= frontier
    return reach, edges


def test_subgraph_restore_quarantines_edges_leaving_it(small, pg_server):
    root, home, _dsn, _uid = small
    start = pg_server.sql("SELECT id::text FROM beliefs ORDER BY id OFFSET 700 LIMIT 1", "kb_small")[0][0]  # fmt: skip
    reach, edges = _reach(pg_server, "kb_small", start, 2)
    inside = {i for i, s, t in edges if s in reach and t in reach}
    leaving = {i for i, s, t in edges if (s in reach) != (t in reach)}
    assert inside and leaving

    pg_server.create_database("kb_sub")
    target = pg_server.dsn("kb_sub")
    p = run_cli(
        "kb", "restore", "small", "--dsn", target, "--belief", start, "--depth", "2", home=home
    )
    assert f"{len(leaving)} edge(s) quarantined" in p.stdout.decode()
    assert "quarantined edge" in p.stderr.decode()
    assert ids(pg_server, "SELECT id FROM beliefs", "kb_sub") == reach
    assert ids(pg_server, "SELECT id FROM belief_edges", "kb_sub") == inside
    assert ids(pg_server, "SELECT id FROM belief_edges_quarantine", "kb_sub") == leaving
    reasons = pg_server.sql("SELECT DISTINCT reason LIKE '%belief % missing' FROM belief_edges_quarantine", "kb_sub")  # fmt: skip
    assert reasons == [(True,)]
    assert pg_server.sql(ORPHANS, "kb_sub") == [(0,)]

    # the same rows again: already there as they are, so nothing is written and nothing clashes
    again = cli_json("kb", "restore", "small", "--dsn", target, "--belief", start, "--depth", "2", home=home)  # fmt: skip
    assert again["restored"]["beliefs"] == 0 and again["restored"]["sources"] == 0
    assert ids(pg_server, "SELECT id FROM beliefs", "kb_sub") == reach
    # another neighbourhood into the same database: it shares the sources (and maybe beliefs)
    other = pg_server.sql("SELECT id::text FROM beliefs ORDER BY id OFFSET 100 LIMIT 1", "kb_small")[0][0]  # fmt: skip
    reach2, _ = _reach(pg_server, "kb_small", other, 1)
    second = cli_json("kb", "restore", "small", "--dsn", target, "--belief", other, "--depth", "1", home=home)  # fmt: skip
    assert second["restored"]["beliefs"] == len(reach2 - reach)
    assert ids(pg_server, "SELECT id FROM beliefs", "kb_sub") == reach | reach2
    assert pg_server.sql(ORPHANS, "kb_sub") == [(0,)]
    # a row the database holds with other values: refused without --replace, overwritten with it
    pg_server.sql(f"UPDATE beliefs SET content = 'edited' WHERE id = '{start}'", "kb_sub")
    err = fails(13, "kb", "restore", "small", "--dsn", target, "--belief", start, home=home)
    assert "1 in beliefs" in err and "--replace" in err
    rep = cli_json("kb", "restore", "small", "--dsn", target, "--belief", start, "--depth", "2", "--replace", home=home)  # fmt: skip
    assert rep["restored"]["beliefs"] == len(reach)
    edited = pg_server.sql(f"SELECT content FROM beliefs WHERE id = '{start}'", "kb_sub")
    assert edited != [("edited",)]
    # --strict: would quarantine, so nothing is written and the command fails
    pg_server.create_database("kb_sub_strict")
    err = fails(12, "kb", "restore", "small", "--dsn", pg_server.dsn("kb_sub_strict"), "--belief", start, "--strict", home=home)  # fmt: skip
    assert "--strict" in err and "nothing was restored" in err
    assert pg_server.sql("SELECT to_regclass('beliefs')", "kb_sub_strict") == [(None,)]


def test_a_database_error_during_restore_is_one_line(small, pg_server):
    """A target whose beliefs table the restore cannot fill (a column of its own, NOT NULL):
    one line naming the server's message and a short detail, exit 18, nothing written."""
    _root, home, _dsn, _uid = small
    pg_server.create_database("kb_odd")
    ddl = "CREATE TABLE beliefs (id uuid PRIMARY KEY, content text, embedding text, confidence real, domains text[], provenance jsonb, created_at timestamptz, superseded_by uuid, extra int NOT NULL)"  # fmt: skip
    pg_server.sql(ddl, "kb_odd")
    err = fails(18, "kb", "restore", "small", "--dsn", pg_server.dsn("kb_odd"), home=home)
    assert err.count("\n") == 1 and "restoring into the database failed" in err, err
    assert "extra" in err and len(err) < 400, err
    assert pg_server.sql("SELECT count(*) FROM beliefs", "kb_odd") == [(0,)]


def test_domain_and_time_window_restore(small, pg_server):
    _root, home, _dsn, _uid = small
    want = ids(
        pg_server,
        "SELECT id FROM beliefs WHERE 'music' = ANY(domains) AND created_at >= '2024-01-01 03:00+00'"
        " AND created_at < '2024-01-01 09:00+00'",
        "kb_small",
    )
    assert want
    pg_server.create_database("kb_dom")
    rep = cli_json(
        "kb", "restore", "latest", "--dsn", pg_server.dsn("kb_dom"), "--domain", "music",
        "--since", "2024-01-01T03:00:00", "--until", "2024-01-01T09:00:00+00:00", home=home,
    )  # fmt: skip
    assert rep["restored"]["beliefs"] == len(want)
    assert ids(pg_server, "SELECT id FROM beliefs", "kb_dom") == want
    assert pg_server.sql(ORPHANS, "kb_dom") == [(0,)]
    restored_edges = rep["restored"]["belief_edges"] + len(rep["quarantined"])
    touching = pg_server.sql(
        "SELECT count(*) FROM belief_edges WHERE source_belief_id IN (SELECT id FROM beliefs"
        " WHERE 'music' = ANY(domains) AND created_at >= '2024-01-01 03:00+00' AND created_at"
        " < '2024-01-01 09:00+00') OR target_belief_id IN (SELECT id FROM beliefs WHERE 'music'"
        " = ANY(domains) AND created_at >= '2024-01-01 03:00+00' AND created_at < '2024-01-01 09:00+00')",
        "kb_small",
    )[0][0]
    assert restored_edges == touching


def test_bad_input_is_one_sentence_and_an_exit_code(small, pg_server):
    root, home, dsn, _uid = small
    bid = pg_server.sql("SELECT id::text FROM beliefs LIMIT 1", "kb_small")[0][0]
    assert "not found" in fails(18, "kb", "show", bid, "--snapshot", "nope", home=home)
    missing = "00000000-0000-4000-8000-000000000000"
    assert "is not in snapshot" in fails(18, "kb", "show", missing, home=home)
    assert "not a belief id" in fails(18, "kb", "show", "not-a-uuid", home=home)
    pg_server.create_database("kb_nodom")
    assert "matches the selection" in fails(
        18, "kb", "restore", "latest", "--dsn", pg_server.dsn("kb_nodom"), "--domain",
        "no-such-domain", home=home,
    )  # fmt: skip
    assert pg_server.sql("SELECT to_regclass('beliefs')", "kb_nodom") == [(None,)]
    assert "in no knowledge-base snapshot" in fails(18, "kb", "history", missing, home=home)
    bad_dsn = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"
    assert "cannot connect" in fails(18, "kb", "snapshot", "--dsn", bad_dsn, home=home)
    assert "cannot connect" in fails(18, "kb", "restore", "latest", "--dsn", bad_dsn, home=home)
    assert "DSN" in fails(18, "kb", "snapshot", "--dsn", "not a dsn ===", home=home)
    pg_server.create_database("kb_empty")
    err = fails(18, "kb", "snapshot", "--dsn", pg_server.dsn("kb_empty"), home=home)
    assert "not a belief graph" in err
    fails(2, "kb", "restore", "latest", "--dsn", dsn, "--depth", "-1", home=home)
    fails(2, "kb", "restore", "latest", "--dsn", dsn, "--since", "yesterday", home=home)
    # a snapshot that is not a knowledge base
    (root / "plain").mkdir(exist_ok=True)
    (root / "plain" / "a.txt").write_text("a")
    run_cli("backup", str(root / "plain"), "--name", "files", home=home)
    assert "holds no knowledge base" in fails(
        18, "kb", "show", bid, "--snapshot", "files", home=home
    )
    assert cli_json("kb", "show", bid, home=home)["id"] == bid  # 'latest' skips it


# -- a source database without foreign keys, with planted orphans ---------------------------
PLANTED = {
    "e0000000-0000-4000-8000-000000000001": "target belief",
    "e0000000-0000-4000-8000-000000000002": "source belief",
    "e0000000-0000-4000-8000-000000000003": "source belief",
}


def test_source_without_foreign_keys_orphans_quarantined(tmp_path, pg_server):
    dsn = pg_server.create_database("kb_nofk")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema.ddl(dim=8, foreign_keys=False))
        conn.execute(
            "INSERT INTO beliefs (id, content, embedding, confidence, domains, provenance,"
            " created_at) SELECT md5('b' || i)::uuid, 'belief ' || i || E' with \\\\ and \"q\"',"
            " (SELECT array_agg(((i * j) % 97)::real / 97 + 1e-7 ORDER BY j)"
            "  FROM generate_series(1, 8) j)::vector, (i % 10)::real / 10, ARRAY['science'],"
            " jsonb_build_object('n', i, 'big', 12345678901234567890.123456789),"
            " '2024-01-01'::timestamptz + i * interval '1 minute' FROM generate_series(1, 60) i"
        )
        conn.execute(
            "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type, weight,"
            " created_at) SELECT md5('e' || i)::uuid, md5('b' || i)::uuid, md5('b' || (i + 1))::uuid,"
            " 'supports', 0.5, '2024-02-01' FROM generate_series(1, 59) i"
        )
        b1 = conn.execute("SELECT md5('b1')::uuid").fetchone()[0]
        conn.execute(
            "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type,"
            " created_at) VALUES (%s, %s, gen_random_uuid(), 'supports', now()),"
            " (%s, gen_random_uuid(), %s, 'contradicts', now()),"
            " (%s, gen_random_uuid(), gen_random_uuid(), 'derives_from', now())",
            (*list(PLANTED)[:1], b1, list(PLANTED)[1], b1, list(PLANTED)[2]),
        )
        conn.execute(
            "UPDATE beliefs SET superseded_by = gen_random_uuid() WHERE id = md5('b7')::uuid"
        )
    source = pg_server.table_checksums("kb_nofk")
    home, _remotes = init_vault(tmp_path)
    run_cli("kb", "snapshot", "--dsn", dsn, "--name", "nofk", home=home)

    pg_server.create_database("kb_nofk_strict")
    err = fails(12, "kb", "restore", "nofk", "--dsn", pg_server.dsn("kb_nofk_strict"), "--strict", home=home)  # fmt: skip
    assert "3 edge(s) would be quarantined" in err

    target = pg_server.create_database("kb_fk")
    p = run_cli("kb", "restore", "nofk", "--dsn", target, home=home)
    stderr = p.stderr.decode()
    for edge_id in PLANTED:
        assert f"quarantined edge {edge_id}" in stderr
    assert "superseded_by cleared" in stderr
    rows = pg_server.sql("SELECT id::text, reason FROM belief_edges_quarantine", "kb_fk")
    assert {i for i, _r in rows} == set(PLANTED)
    for i, reason in rows:
        assert PLANTED[i] in reason and "missing" in reason
    assert "target belief" in dict(rows)["e0000000-0000-4000-8000-000000000003"]
    restored = pg_server.table_checksums("kb_fk")
    assert restored["belief_edges"][0] == 59 and restored["sources"] == source["sources"]
    assert pg_server.sql(ORPHANS, "kb_fk") == [(0,)]
    # every belief as it was, but the one whose superseded_by pointed nowhere
    same = pg_server.sql("SELECT count(*) FROM beliefs WHERE id <> md5('b7')::uuid", "kb_fk")[0][0]
    assert same == 59
    assert pg_server.sql(EMB_MD5, "kb_fk") == pg_server.sql(EMB_MD5, "kb_nofk")
    prov = "SELECT provenance::text FROM beliefs WHERE id = md5('b3')::uuid"
    assert pg_server.sql(prov, "kb_fk") == pg_server.sql(prov, "kb_nofk")
    # the foreign keys of the restored schema hold
    with pytest.raises(psycopg.errors.ForeignKeyViolation), psycopg.connect(target) as conn:
        conn.execute(
            "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type,"
            " created_at) VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(),"
            " 'supports', now())"
        )


# -- history and diff across three snapshots with known changes ------------------------------
def test_history_and_diff_across_three_snapshots(tmp_path, pg_server):
    dsn = pg_server.make_kb(400, seed=9, dbname="kb_hist")
    home, _remotes = init_vault(tmp_path)
    q = lambda sql, *a: pg_server.sql(sql, "kb_hist", params=a or None)  # noqa: E731
    run_cli("kb", "snapshot", "--dsn", dsn, "--name", "s1", home=home)

    ids_sorted = [r[0] for r in q("SELECT id::text FROM beliefs ORDER BY id")]
    a, b, d = ids_sorted[10], ids_sorted[200], ids_sorted[300]
    d_edges = {r[0] for r in q("SELECT id::text FROM belief_edges WHERE %s IN (source_belief_id::text, target_belief_id::text)", d)}  # fmt: skip
    new_belief = "0abc0000-0000-4000-8000-000000000000"
    new_edge = "0ede0000-0000-4000-8000-000000000000"
    a_lost = {r[0] for r in q("SELECT id::text FROM belief_edges WHERE (source_belief_id::text, target_belief_id::text) IN ((%s, %s), (%s, %s))", a, d, d, a)}  # fmt: skip
    pointing = {r[0] for r in q("SELECT id::text FROM beliefs WHERE superseded_by::text = %s", d)}
    q("UPDATE beliefs SET content = content || ' (revised)', confidence = 0.125 WHERE id = %s", a)
    q("DELETE FROM belief_edges WHERE %s IN (source_belief_id::text, target_belief_id::text)", d)
    q("UPDATE beliefs SET superseded_by = NULL WHERE superseded_by = %s", d)
    q("DELETE FROM beliefs WHERE id = %s", d)
    q(
        "INSERT INTO beliefs (id, content, embedding, confidence, domains, created_at)"
        " SELECT %s, 'a new belief', embedding, 0.5, ARRAY['math'], now() FROM beliefs WHERE id = %s",
        new_belief, a,
    )  # fmt: skip
    q(
        "INSERT INTO belief_edges (id, source_belief_id, target_belief_id, edge_type, created_at)"
        " VALUES (%s, %s, %s, 'supports', now())",
        new_edge, a, new_belief,
    )  # fmt: skip
    run_cli("kb", "snapshot", "--dsn", dsn, "--name", "s2", home=home)

    old_edge = q(
        "SELECT id::text FROM belief_edges WHERE %s NOT IN (source_belief_id::text,"
        " target_belief_id::text) AND id <> %s ORDER BY id LIMIT 1",
        a, new_edge,
    )[0][0]  # fmt: skip
    q("UPDATE beliefs SET embedding = embedding + embedding WHERE id = %s", b)
    q("DELETE FROM belief_edges WHERE id = %s", old_edge)
    run_cli("kb", "snapshot", "--dsn", dsn, "--name", "s3", home=home)

    d12 = cli_json("kb", "diff", "s1", "s2", home=home)
    assert d12["beliefs"]["added"] == [new_belief]
    assert d12["beliefs"]["removed"] == [d]
    assert d12["beliefs"]["changed"] == {a: ["content", "confidence"]} | {
        i: ["superseded_by"]
        for i in pointing  # make_kb's supersession chains
    }
    assert d12["belief_edges"] == {"added": [new_edge], "changed": {}, "removed": sorted(d_edges)}
    assert d12["counts"]["beliefs"] == {"added": 1, "changed": 1 + len(pointing), "removed": 1}

    d23 = cli_json("kb", "diff", "s2", "s3", home=home)
    assert d23["beliefs"] == {"added": [], "changed": {b: ["embedding"]}, "removed": []}
    assert d23["belief_edges"] == {"added": [], "changed": {}, "removed": [old_edge]}
    human = run_cli("kb", "diff", "s2", "s3", home=home).stdout.decode()
    assert f"~ {b} (embedding)" in human and f"- {old_edge}" in human

    ha = cli_json("kb", "history", a, home=home)
    assert [s["state"] for s in ha["snapshots"]] == ["added", "changed", "unchanged"]
    step = ha["snapshots"][1]
    assert set(step["changes"]) == {"content", "confidence"}
    assert step["changes"]["confidence"][1] == 0.125
    assert [e["id"] for e in step["edges_added"]["out"]] == [new_edge]
    assert {e["id"] for e in step["edges_removed"]["out"] + step["edges_removed"]["in"]} == a_lost
    hn = cli_json("kb", "history", new_belief, home=home)
    assert [s["state"] for s in hn["snapshots"]] == ["absent", "added", "unchanged"]
    assert [e["id"] for e in hn["snapshots"][1]["edges_added"]["in"]] == [new_edge]
    hd = cli_json("kb", "history", d, home=home)
    assert [s["state"] for s in hd["snapshots"]] == ["added", "removed", "absent"]
    # show of an older snapshot sees the belief as it was
    assert cli_json("kb", "show", a, "--snapshot", "s1", home=home)["confidence"] != 0.125
    human = run_cli("kb", "history", a, home=home).stdout.decode()
    assert "changed" in human and "confidence" in human


def test_a_name_several_kb_snapshots_share_reads_the_newest_and_says_so(tmp_path, pg_server):
    """`kb show --snapshot NAME` (and restore/diff) with two knowledge-base snapshots of that
    name read the newest, as `vaultfs ls` does, and say so on stderr naming both ids (they
    used to take one silently); an id reads its own snapshot without a note."""
    dsn = pg_server.make_kb(60, seed=4, dbname="kb_twice")
    home, _remotes = init_vault(tmp_path, n_remotes=3)
    bid = pg_server.sql("SELECT id::text FROM beliefs ORDER BY id LIMIT 1", "kb_twice")[0][0]
    snaps = []
    for conf in (0.25, 0.75):
        pg_server.sql("UPDATE beliefs SET confidence = %s WHERE id = %s", "kb_twice", params=(conf, bid))  # fmt: skip
        snaps.append(cli_json("kb", "snapshot", "--dsn", dsn, "--name", "twice", home=home))
    old, new = (s["snapshot"] for s in snaps)
    proc = run_cli("kb", "show", bid, "--snapshot", "twice", "--json", home=home)
    doc = json.loads(proc.stdout)
    assert doc["snapshot"]["id"] == new and doc["confidence"] == 0.75
    note = " ".join(proc.stderr.decode().split())
    assert f"2 snapshots are named 'twice': using the newest, {new}" in note, note
    assert old in note, note
    proc = run_cli("kb", "show", bid, "--snapshot", old, "--json", home=home)
    assert json.loads(proc.stdout)["confidence"] == 0.25
    assert "snapshots are named" not in proc.stderr.decode()
    proc = run_cli("kb", "diff", old, "twice", home=home)  # one note for the name, not the id
    assert proc.stderr.decode().count("snapshots are named 'twice'") == 1, proc.stderr


# -- the kb root in the signed manifest (docs/format.md 10.2, key `kb`) ----------------------
def _newest_manifest(remote: str, keyfile: Path):
    from helpers import PASSPHRASE

    from vaultfs import manifest
    from vaultfs.keys import read_keyfile

    keys = read_keyfile(keyfile, PASSPHRASE)
    newest = max(Path(remote, "manifests").iterdir(), key=lambda p: int(p.name.split("-")[0]))
    return manifest.decode(keys, newest.read_bytes()).contents


def test_kb_root_is_signed_and_restore_checks_it(tmp_path, pg_server):
    dsn = pg_server.make_kb(300, seed=9, dbname="kb_signed")
    # a belief without an embedding travels as a NULL record (length -1)
    pg_server.sql("UPDATE beliefs SET embedding = NULL WHERE id = (SELECT id FROM beliefs ORDER BY id LIMIT 1)", "kb_signed")  # fmt: skip
    source = pg_server.table_checksums("kb_signed")
    home, remotes = init_vault(tmp_path)
    first = cli_json("kb", "snapshot", "--dsn", dsn, "--name", "one", home=home)
    run_cli("backup", str(Path(__file__)), home=home)  # a later commit without a kb
    body = _newest_manifest(remotes[0], home / "key.json")
    assert body.kb == {first["snapshot"]: first["kb"]}
    assert body.kb[first["snapshot"]]["tables"]["beliefs"]["rows"] == 300

    # the local index row the manifests sign, altered: the local restore refuses, exit 12
    import sqlite3

    db = sqlite3.connect(home / "index.db")
    with db:
        db.execute("UPDATE kb_roots SET summary = replace(summary, '\"rows\":300', '\"rows\":301')")
    db.close()
    pg_server.create_database("kb_signed_local")
    err = fails(12, "kb", "restore", "one", "--dsn", pg_server.dsn("kb_signed_local"), home=home)
    assert "signs" in err
    assert pg_server.sql("SELECT to_regclass('beliefs')", "kb_signed_local") == [(None,)]

    # from the remotes alone the signed manifest is the reference, and it matches
    pg_server.create_database("kb_signed_remote")
    rep = cli_json(
        "kb", "restore", "one", "--dsn", pg_server.dsn("kb_signed_remote"), "--from",
        remotes[0], "--from", remotes[2], "--from", remotes[4], "--keyfile",
        str(home / "key.json"), home=tmp_path / "cold",
    )  # fmt: skip
    assert rep["restored"]["beliefs"] == 300
    assert pg_server.table_checksums("kb_signed_remote") == source
    assert pg_server.sql("SELECT count(*) FROM beliefs WHERE embedding IS NULL", "kb_signed_remote") == [(1,)]  # fmt: skip
    for db_name in ("kb_signed", "kb_signed_local", "kb_signed_remote"):
        pg_server.drop_database(db_name)


# -- awkward values: the export's lines, and a round trip bit for bit ------------------------
AWKWARD_TEXT = "quote \" backslash \\ newline \n tab \t cr \r ctrl \x01 é 漢字 🙂 '"
AWKWARD = [
    # content, embedding, confidence, domains, provenance, created_at, superseded_by (index)
    (AWKWARD_TEXT, "[-0,1.5e-38,3.4e38,-1.5]", 0.1, [], "{}", "2024-02-29 23:59:59.999999+00", 1),
    (
        "",
        None,
        1.0,
        ["a,b", 'q"uote', "back\\slash", None, "{braces}", "ünï", ""],
        "null",
        "infinity",
        None,
    ),  # fmt: skip
    (
        "\\N and \\.",
        "[0,0,0,0]",
        0.0,
        ["x"],
        '{"k": "a\\"b\\\\c\\nd", "big": 12345678901234567890.123456789, "u": "\\u00e9", "e": 1e400}',
        "0001-01-01 00:00:00+00",
        0,
    ),  # fmt: skip
]


def test_awkward_values_export_as_json_build_object_and_round_trip(tmp_path, pg_server):
    """Lines are byte for byte what json_build_object writes, whatever the values (quotes,
    backslashes, control characters, non-ASCII, NULLs, JSON null, empty arrays and strings,
    NaN and infinite weights, infinite and year-1 timestamps, -0 in an embedding); a snapshot
    restores into a fresh database and over itself with --replace, rows and embeddings equal."""
    from vaultfs.kb import snapshot

    dsn = pg_server.create_database("kb_awkward")
    # buckets 01, 02 and 81: both halves of the export (two connections)
    ids_ = [f"{b}000000-0000-4000-8000-000000000000" for b in ("01", "02", "81")]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema.ddl(dim=4))
        for i, (content, emb, conf, doms, prov, created, _sup) in zip(ids_, AWKWARD, strict=True):
            conn.execute(
                "INSERT INTO beliefs VALUES (%s, %s, %s::vector, %s, %s, %s::jsonb, %s, NULL)",
                (i, content, emb, conf, doms, prov, created),
            )
        edges = [
            ("NaN", "null"),
            ("Infinity", '{"ü": [1, "\\t"]}'),
            ("-Infinity", "{}"),
            ("0.1", "[]"),
        ]
        for n, (w, meta) in enumerate(edges):
            conn.execute(
                "INSERT INTO belief_edges VALUES (%s, %s, %s, %s, %s::real, now(), %s::jsonb)",
                (f"e{n}000000-0000-4000-8000-000000000000", ids_[n % 3], ids_[(n + 1) % 3],
                 schema.EDGE_TYPES[n], w, meta),
            )  # fmt: skip
        conn.execute(
            "INSERT INTO sources VALUES (gen_random_uuid(), %s, NULL, NULL),"
            " (gen_random_uuid(), 'file:///x', %s, '2024-01-01')",
            (AWKWARD_TEXT, AWKWARD_TEXT),
        )

    files: dict[str, bytes] = {}
    m = snapshot.export(dsn, files.__setitem__)
    assert m.tables["beliefs"]["rows"] == 3 and m.tables["belief_edges"]["rows"] == 4

    def rendered(sql: str) -> bytes:
        with psycopg.connect(dsn) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            return b"".join(r[0].encode() + b"\n" for r in conn.execute(sql).fetchall())

    def stored(prefix: str) -> bytes:
        return b"".join(files[p] for p in sorted(files) if p.startswith(prefix))

    def jbo(keys) -> str:
        return "json_build_object(" + ", ".join(f"'{k}', {k}" for k, _kind in keys) + ")::text"

    for prefix, keys, table, order in [
        ("kb/beliefs/", snapshot.BELIEF_KEYS, "beliefs", "id"),
        ("kb/edges/out/", snapshot.EDGE_OUT_KEYS, "belief_edges", "source_belief_id, id"),
        ("kb/edges/in/", snapshot.EDGE_IN_KEYS, "belief_edges", "target_belief_id, id"),
        ("kb/sources.jsonl", snapshot.SOURCE_KEYS, "sources", "id"),
    ]:
        assert stored(prefix) == rendered(f"SELECT {jbo(keys)} FROM {table} ORDER BY {order}")
        for line in stored(prefix).splitlines():
            json.loads(line)

    home, _remotes = init_vault(tmp_path)
    run_cli("kb", "snapshot", "--dsn", dsn, "--name", "awk", home=home)
    source = pg_server.table_checksums("kb_awkward")
    target = pg_server.create_database("kb_awkward_back")
    for extra in ([], ["--replace"]):  # a fresh database, then over the same rows
        rep = cli_json("kb", "restore", "awk", "--dsn", target, *extra, home=home)
        assert rep["quarantined"] == [] and rep["cleared_superseded_by"] == []
        assert pg_server.table_checksums("kb_awkward_back") == source
        assert pg_server.sql(EMB_MD5, "kb_awkward_back") == pg_server.sql(EMB_MD5, "kb_awkward")
    weights = "SELECT weight::text FROM belief_edges ORDER BY id"
    assert pg_server.sql(weights, "kb_awkward_back") == [("NaN",), ("Infinity",), ("-Infinity",), ("0.1",)]  # fmt: skip
    # the keys, indexes and foreign keys dropped for the load are all back
    defs = "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid IN ('beliefs'::regclass, 'belief_edges'::regclass, 'sources'::regclass) ORDER BY 1"  # fmt: skip
    idx = "SELECT indexdef FROM pg_indexes WHERE tablename IN ('beliefs', 'belief_edges', 'sources') ORDER BY 1"  # fmt: skip
    for q in (defs, idx):
        assert pg_server.sql(q, "kb_awkward_back") == pg_server.sql(q, "kb_awkward")


def test_snapshot_export_started_before_the_vault_opens_stops_cleanly(small, tmp_path, pg_server):
    """`kb snapshot` starts the export before it unlocks the key: a wrong passphrase or a
    home without a vault ends the command with that error (no hang, no traceback), and the
    export's transaction is gone with it."""
    _root, home, dsn, _uid = small
    before = run_cli("snapshots", "--json", home=home).stdout
    p = run_cli("kb", "snapshot", "--dsn", dsn, home=home, passphrase="not the passphrase", check=10)  # fmt: skip
    assert "Traceback" not in p.stderr.decode() and p.stderr.strip()
    assert "no vault" in fails(16, "kb", "snapshot", "--dsn", dsn, home=tmp_path / "nowhere").lower()  # fmt: skip
    assert run_cli("snapshots", "--json", home=home).stdout == before
    open_tx = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'kb_small' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()"  # fmt: skip
    assert pg_server.sql(open_tx, "kb_small") == [(0,)]


def test_whole_restore_parts_follow_the_segments():
    """A whole graph is read in parts of whole buckets (a bucket's lines, embeddings and
    out-edges together), in the order the buckets lie in the segments, of about equal size."""
    from vaultfs.kb import restore

    assert restore.whole_parts({}) == [[]]
    mb = 1 << 20
    # the export stores the lower and upper halves interleaved: 00, 80, 01, 81, …
    places = {}
    for i in range(256):
        b = f"{i:02x}"
        seg = 2 * i if i < 128 else 2 * (i - 128) + 1
        for f in (layout.beliefs_path, layout.embeddings_path, layout.edges_out_path):
            places[f(b)] = (mb, seg)
        places[layout.edges_in_path(b)] = (mb, seg)  # not read by a restore
    groups = restore.whole_parts(places)
    assert len(groups) == restore.MAX_PARTS
    assert sorted(b for g in groups for b in g) == [f"{i:02x}" for i in range(256)]
    assert [len(g) for g in groups] == [64] * 4
    assert set(groups[0]) == {f"{i:02x}" for i in (*range(32), *range(128, 160))}
    small = {p: (mb, s) for p, (_n, s) in places.items() if p.endswith(("/00.jsonl", "/00.bin"))}
    assert restore.whole_parts(small) == [["00"]]


# -- the export renders values as to_json does, and hands files over in bounded memory -------
def test_value_shortcuts_render_exactly_as_to_json(pg_server):
    """The export's cheaper renderings (a finite number's output text, an edge type of the
    schema as a constant) give to_json's bytes for every value, including the ones they hand
    back to to_json: NaN, infinities, NULL, -0, extremes, and edge types the schema lacks."""
    from vaultfs.kb import snapshot

    cases = {
        "real": ["0", "-0", "1e-45", "3.4028235e38", "0.1", "NaN", "Infinity", "-Infinity", None],
        "float8": ["0.1", "-1e-300", "NaN", "-Infinity", None],
        "numeric": ["12345678901234567890.123456789", "NaN", "Infinity", "-0.000", None],
        "text": [*schema.EDGE_TYPES, 'quo"te', "new\nline", "ünï", "", None],
    }
    for typ, values in cases.items():
        expr = snapshot._VALUE["edge_type" if typ == "text" else "real"].format(c="x")
        rows = pg_server.sql(
            f"SELECT x::text, {expr}, coalesce(to_json(x)::text, 'null')"
            f" FROM unnest(%s::{typ}[]) AS t(x)",
            params=(values,),
        )
        assert len(rows) == len(values)
        for x, ours, want in rows:
            assert ours == want, (typ, x)


def test_export_queue_bound_in_bytes_waits_and_stops(small, pg_server, monkeypatch):
    """With room for one file at a time the export hands over every file unchanged, each
    waiting until the last was taken; closed after one file, an export
    waiting for room stops (no hang) and its transaction ends."""
    from vaultfs.kb import snapshot

    _root, _home, dsn, _uid = small
    direct: list[tuple[str, bytes]] = []
    want = snapshot.export(dsn, lambda p, d: direct.append((p, d)))
    monkeypatch.setattr(snapshot, "STORE_QUEUE_BYTES", 1)
    with snapshot.Export(dsn) as ex:
        got = list(ex.files())
        m = ex.manifest()
    assert (m.root, m.files) == (want.root, want.files)
    # every file but the manifest (its `created` is the transaction's time) byte for byte;
    # the two halves of the buckets interleave in any order, the manifest comes last
    assert got[-1][0] == layout.MANIFEST and len(got) == len(want.files) + 1
    assert dict(got[:-1]) == dict(direct[:-1])
    with snapshot.Export(dsn) as ex:
        assert next(iter(ex.files()))[0] == layout.SOURCES
    open_tx = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'kb_small' AND xact_start IS NOT NULL AND pid <> pg_backend_pid()"  # fmt: skip
    assert pg_server.sql(open_tx, "kb_small") == [(0,)]
