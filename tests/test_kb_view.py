"""The browsable view of a knowledge-base snapshot in a real mount (docs/kb.md, "Browsing"):
``.snapshots/<name>/kb/beliefs/<id>.json`` generated beside the stored bucket files, and
``kb/edges/`` as stored; ``grep -r`` and ``stat`` work on it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import init_local_vault, needs_fuse, run_cli

from vaultfs.kb import view

pytestmark = [
    pytest.mark.pg,
    needs_fuse,
]


def test_render_bucket_gives_each_belief_its_row_and_edges() -> None:
    a, b = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"
    beliefs = f'{{"id" : "{a}", "content" : "x"}}\n{{"id" : "{b}", "content" : "y"}}\n'.encode()
    out = f'{{"source_belief_id" : "{a}", "id" : "e1", "target_belief_id" : "{b}"}}\n'.encode()
    inc = f'{{"target_belief_id" : "{b}", "id" : "e1", "source_belief_id" : "{a}"}}\n'.encode()
    docs = {k: json.loads(v) for k, v in view.render_bucket(beliefs, out, inc).items()}
    assert docs[f"{a}.json".encode()] == {
        "id": a,
        "content": "x",
        "edges": {"out": [{"id": "e1", "target_belief_id": b}], "in": []},
    }
    assert docs[f"{b}.json".encode()]["edges"] == {
        "out": [],
        "in": [{"id": "e1", "source_belief_id": a}],
    }


def test_a_plain_directory_named_kb_beliefs_gets_no_documents() -> None:
    """A snapshot of ordinary files that happen to sit in kb/beliefs/ (no kb/manifest.json):
    the view adds nothing and reads no bucket, whatever the files hold."""
    reads: list[str] = []

    def read(snap: int, path: str) -> bytes | None:
        reads.append(path)
        return None if path == "kb/manifest.json" else b"not json\n"

    v = view.BeliefView(read)
    assert v.listing(1, [b"00.jsonl", b"notes.txt"]) == []
    assert v.size(1, b"00000000-0000-0000-0000-000000000000.json") is None
    assert reads == ["kb/manifest.json"]


def test_snapshot_beliefs_browsable_in_the_mount(tmp_path: Path, pg_server) -> None:
    dsn = pg_server.make_kb(300, seed=3, dbname="kbview")
    home = init_local_vault(tmp_path).home
    run_cli("kb", "snapshot", "--dsn", dsn, "--name", "v1", home=home)
    ids = sorted(str(r[0]) for r in pg_server.sql("SELECT id FROM beliefs", "kbview"))
    some = ids[len(ids) // 2]
    show = json.loads(run_cli("kb", "show", some, "--json", home=home).stdout)

    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", str(mp), home=home)
    try:
        kb = mp / ".snapshots" / "v1" / "kb"
        names = os.listdir(kb / "beliefs")
        assert sorted(n for n in names if n.endswith(".json")) == [f"{i}.json" for i in ids]
        assert "00.jsonl" in names or any(n.endswith(".jsonl") for n in names)
        doc_path = kb / "beliefs" / f"{some}.json"
        raw = doc_path.read_bytes()
        assert doc_path.stat().st_size == len(raw)
        doc = json.loads(raw)
        expected = {k: v for k, v in show.items() if k not in ("snapshot", "bytes_read", "seconds")}
        assert doc == expected
        # the edges the database holds for the belief, out and in
        out = pg_server.sql(
            "SELECT id::text FROM belief_edges WHERE source_belief_id = %s", "kbview", (some,)
        )
        inc = pg_server.sql(
            "SELECT id::text FROM belief_edges WHERE target_belief_id = %s", "kbview", (some,)
        )
        assert sorted(e["id"] for e in doc["edges"]["out"]) == sorted(r[0] for r in out)
        assert sorted(e["id"] for e in doc["edges"]["in"]) == sorted(r[0] for r in inc)

        # grep -r finds a belief by its content, in its document and its bucket file
        needle = doc["content"][:40]
        hits = subprocess.run(
            ["grep", "-rlF", needle, str(kb / "beliefs")], capture_output=True, text=True
        )
        assert hits.returncode == 0, hits.stderr
        found = {Path(p).name for p in hits.stdout.split()}
        assert f"{some}.json" in found
        assert f"{some[:2]}.jsonl" in found
        assert any(n.endswith(".jsonl") for n in os.listdir(kb / "edges" / "out"))

        # documents are read-only; unknown ids and other spellings do not exist
        with pytest.raises(OSError) as e:
            open(doc_path, "r+b").close()
        assert e.value.errno == errno.EROFS
        assert not (kb / "beliefs" / "00000000-0000-0000-0000-000000000000.json").exists()
        assert not (kb / "beliefs" / f"{some.upper()}.json").exists()
        assert not (kb / "beliefs" / "not-a-uuid.json").exists()
    finally:
        run_cli("umount", str(mp), home=home, check=None)
    assert not os.path.ismount(mp)
