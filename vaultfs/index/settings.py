"""The settings table: the vault's fixed parameters, typed, and the other rows by name.

``settings`` is a key-value table of text (see schema.py). The parameters a vault is made
with (redundancy, segment and chunk sizes) are read and written only through
:class:`VaultParams`; the key rows that change over a vault's life belong to the modules
that own them (``keyring``: epoch, suite, reencrypt_epoch; ``manifests``: unshipped_since).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import erasure
from ..chunker import AVG_SIZE

if TYPE_CHECKING:
    from . import Index

#: Segment size of a vault whose index names none (and the default for new vaults).
DEFAULT_SEGMENT_SIZE = 4 * 1024 * 1024

#: The ``schema`` setting written at init (the settings layout; the table layout is
#: ``PRAGMA user_version``, see schema.py).
SETTINGS_SCHEMA = 1


@dataclass(frozen=True)
class VaultParams:
    """The parameters a vault is made with; fixed for its life.

    Read from an index with :meth:`read` (missing rows take the defaults older vaults were
    made with); written once, at init, with :meth:`write`.
    """

    vault_id: str  #: hex of the 16-byte vault id (settings ``vault_id``)
    k: int  #: shards needed to decode a new segment (0: unknown)
    n: int  #: shards written per new segment
    segment_size: int = DEFAULT_SEGMENT_SIZE  #: bytes per full segment
    chunk_avg: int = AVG_SIZE  #: average chunk size of the chunker
    created: float | None = None  #: unix time of ``vaultfs init``
    #: append-only (``vaultfs init --immutable``): never asks a remote to delete or overwrite
    #: an object (docs/operations.md, "Immutable vaults"); settings ``immutable``, 1 or absent
    immutable: bool = False
    #: S3 Object Lock retention put on the S3 remotes of an immutable vault (``init
    #: --object-lock``; objectlock.lock_spec), e.g. ``365d``; settings ``object_lock``
    object_lock: str | None = None

    @property
    def ec_alg(self) -> int:
        """The erasure algorithm of new segments (0 when k is unknown)."""
        return erasure.choose_alg(self.k, self.n) if self.k else 0

    @classmethod
    def read(cls, index: Index) -> VaultParams:
        """The parameters recorded in ``index``."""
        rows = dict(
            index.q(
                "SELECT key, value FROM settings WHERE key IN"
                " ('vault_id', 'k', 'n', 'segment_size', 'chunk_avg', 'created', 'immutable',"
                " 'object_lock')"
            )
        )
        created = rows.get("created")
        return cls(
            vault_id=rows.get("vault_id") or "",
            k=int(rows.get("k") or 0),
            n=int(rows.get("n") or 0),
            segment_size=int(rows.get("segment_size") or DEFAULT_SEGMENT_SIZE),
            chunk_avg=int(rows.get("chunk_avg") or AVG_SIZE),
            created=float(created) if created else None,
            immutable=rows.get("immutable") == "1",
            object_lock=rows.get("object_lock") or None,
        )

    def write(self, db: sqlite3.Connection) -> None:
        """Record these parameters (inside the init transaction)."""
        put(
            db,
            {
                "schema": SETTINGS_SCHEMA,
                "vault_id": self.vault_id,
                "k": self.k,
                "n": self.n,
                "segment_size": self.segment_size,
                "chunk_avg": self.chunk_avg,
                "created": time.time() if self.created is None else self.created,
                **({"immutable": 1} if self.immutable else {}),
                **({"object_lock": self.object_lock} if self.object_lock else {}),
            },
        )


def put(db: sqlite3.Connection, values: dict[str, object]) -> None:
    """Set settings rows (values stored as their ``str``)."""
    db.executemany(
        "INSERT OR REPLACE INTO settings VALUES (?, ?)",
        [(key, str(value)) for key, value in values.items()],
    )
