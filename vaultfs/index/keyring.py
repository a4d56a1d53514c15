"""Queries about key epochs and crypto suites (tables ``epochs``, ``suites``; settings
``epoch`` and ``suite``: the epoch and suite new writes use)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from . import settings

if TYPE_CHECKING:
    from ..keys import VaultKeys
    from . import Index


def retired_suites(index: Index) -> set[int]:
    """Suites every read under which is refused."""
    return {sid for (sid,) in index.q("SELECT id FROM suites WHERE state='retired'")}


def epochs(index: Index) -> list[tuple[int, int, bytes]]:
    """(epoch, suite, wrapped data key) of every key epoch."""
    return index.q("SELECT epoch, suite, wrapped FROM epochs ORDER BY epoch")


def current(index: Index, default_suite: int) -> tuple[int, int]:
    """(epoch, suite) new writes use; epoch 0 and ``default_suite`` when unset."""
    rows = dict(index.q("SELECT key, value FROM settings WHERE key IN ('epoch', 'suite')"))
    return int(rows.get("epoch") or 0), int(rows.get("suite") or default_suite)


def next_epoch(db: sqlite3.Connection) -> int:
    """The number the next key epoch gets."""
    return (db.execute("SELECT max(epoch) FROM epochs").fetchone()[0] or 0) + 1


def add_epoch(
    db: sqlite3.Connection, epoch: int, suite: int, wrapped: bytes, created: float
) -> None:
    """Record key epoch ``epoch``: its suite and its data key wrapped to the vault's key."""
    db.execute("INSERT INTO epochs VALUES (?, ?, ?, ?)", (epoch, suite, wrapped, created))


def set_current(db: sqlite3.Connection, epoch: int, suite: int) -> None:
    """Make ``epoch`` (under ``suite``) the one new writes use."""
    settings.put(db, {"epoch": epoch, "suite": suite})


def add_active_suite(db: sqlite3.Connection, suite: int, now: float) -> None:
    """Note that ``suite`` is in use (a suite the table has keeps its state)."""
    db.execute("INSERT OR IGNORE INTO suites VALUES (?, 'active', ?)", (suite, now))


def set_slhdsa(db: sqlite3.Connection, keys: VaultKeys) -> None:
    """Record the vault's SLH-DSA key: public key and sealed secret key (hex) and its
    parameter set (:meth:`VaultKeys.slhdsa_settings`)."""
    settings.put(db, keys.slhdsa_settings())


def slhdsa(index: Index) -> tuple[str, str, str | None] | None:
    """(public key hex, sealed secret hex, parameter set or None for older vaults) of the
    vault's SLH-DSA key; None for a vault made before it had one."""
    pub, sealed = index.get("slhdsa_public"), index.get("slhdsa_sealed")
    if not (pub and sealed):
        return None
    return pub, sealed, index.get("slhdsa_param")
