"""The benchmark dataset: plain pg_dumps of the generated knowledge base, cached between runs.

For ``beliefs`` and ``seed`` three files are kept in the cache directory
(``$XDG_CACHE_HOME/vaultfs-bench`` or ``~/.cache/vaultfs-bench``, or ``$VAULTFS_BENCH_CACHE``):

- ``kb-<beliefs>-s<seed>-<gen>.sql``: ``pg_dump -Fp`` of the base made by make_kb.py;
- ``...-changed.sql``: the same database after :data:`CHANGE_SQL` (1% of the beliefs revised:
  content, confidence and embedding), dumped again. Postgres writes the new row versions
  elsewhere in the heap, so the dump's row order shifts as it does in real life;
- ``...-quarter.sql``: the first quarter of the base dump (cut at a line end), for checking
  that memory does not grow with input size.

``<gen>`` is a hash of make_kb.py and :data:`CHANGE_SQL`, so a changed generator is rebuilt.
Files are written under a temporary name and renamed, so an interrupted build leaves no
half-file behind.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .pg import MAKE_KB, PgServer

# Revise 1% of the beliefs, picked by id order (ids are seeded-random UUIDs, so the rows are
# spread over the whole table): a note appended to the text, a lower confidence and a slightly
# shrunk embedding, as a re-embedding after an edit would give.
CHANGE_SQL = """
UPDATE beliefs SET
  content = content || ' (revised)',
  confidence = round((confidence * 0.9)::numeric, 4),
  embedding = (
    SELECT array_agg(round((v * 0.98)::numeric, 6) ORDER BY i)::real[]
    FROM unnest(embedding::real[]) WITH ORDINALITY AS t(v, i)
  )::vector
WHERE id IN (SELECT id FROM beliefs ORDER BY id LIMIT {count})
"""


def cache_dir() -> Path:
    env = os.environ.get("VAULTFS_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vaultfs-bench"


@dataclass(frozen=True)
class Dataset:
    """Paths of the three dumps and what made them."""

    beliefs: int
    seed: int
    changed_rows: int
    base: Path
    changed: Path
    quarter: Path

    def describe(self) -> dict:
        return {
            "beliefs": self.beliefs,
            "seed": self.seed,
            "changed_beliefs": self.changed_rows,
            "base": str(self.base),
            "base_bytes": self.base.stat().st_size,
            "changed_bytes": self.changed.stat().st_size,
            "quarter_bytes": self.quarter.stat().st_size,
        }


def _generator_tag() -> str:
    h = hashlib.sha256(MAKE_KB.read_bytes() if MAKE_KB.exists() else b"")
    h.update(CHANGE_SQL.encode())
    return h.hexdigest()[:10]


def _quarter(src: Path, dest: Path) -> None:
    """Copy the first quarter of ``src`` (ending at a newline) to ``dest``."""
    want = src.stat().st_size // 4
    with open(src, "rb") as f, open(dest, "wb") as out:
        left = want
        while left > 0:
            buf = f.read(min(left, 1 << 20))
            if not buf:
                break
            out.write(buf)
            left -= len(buf)
        out.write(f.readline())


def ensure(beliefs: int, seed: int = 7, log: Callable[[str], None] = print) -> Dataset:
    """Return the dataset for ``beliefs``/``seed``, building what the cache lacks."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    stem = d / f"kb-{beliefs}-s{seed}-{_generator_tag()}"
    count = max(1, beliefs // 100)
    ds = Dataset(
        beliefs,
        seed,
        count,
        Path(f"{stem}.sql"),
        Path(f"{stem}-changed.sql"),
        Path(f"{stem}-quarter.sql"),
    )
    if not (ds.base.exists() and ds.changed.exists()):
        log(f"building the {beliefs:,}-belief dataset in embedded Postgres (cached in {d})")
        with PgServer() as pg:
            pg.make_kb("kb", beliefs, seed)
            tmp = ds.base.with_suffix(".tmp")
            pg.pg_dump("kb", tmp)
            os.replace(tmp, ds.base)
            pg.sql(CHANGE_SQL.format(count=count), "kb")
            tmp = ds.changed.with_suffix(".tmp")
            pg.pg_dump("kb", tmp)
            os.replace(tmp, ds.changed)
    if not ds.quarter.exists():
        tmp = ds.quarter.with_suffix(".tmp")
        _quarter(ds.base, tmp)
        os.replace(tmp, ds.quarter)
    return ds
