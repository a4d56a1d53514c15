"""Continuous archiving of a Postgres primary's write-ahead log into a vault
(docs/operations.md, "Continuous archiving of Postgres (WAL)").

Postgres runs ``archive_command`` once per finished WAL file and deletes (or recycles) the
file only after the command exits 0, so ``vaultfs wal push %p %f`` returns 0 only once the
file is durable: committed as file ``wal/NAME`` of its own snapshot ``wal-NAME`` (the commit
is durable in the home, docs/design.md invariants 1-3) and then placed on at least k remotes
(the caller flushes with a quorum; exit 3 otherwise, and Postgres retries the same file).
``restore_command`` runs ``vaultfs wal fetch %f %p`` for each file a recovery replays; a file
no snapshot holds is the normal end of the archive for Postgres (it asks for ``.history``
files and the segment after the last), reported with a non-zero exit.

A push of a name already archived is a retry (Postgres did not see the earlier exit 0, or the
flush behind it failed): identical bytes are acknowledged without a new snapshot, other
bytes are refused, as the Postgres documentation asks of an archive command.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .backup import backup_stream
from .errors import InputError, IntegrityError
from .index import snapshots
from .shardreader import ShardsUnavailable

if TYPE_CHECKING:
    from .vault import Vault

#: The names Postgres archives: a segment (timeline, log, segment: 24 hex digits), a
#: ``.partial`` segment (a promoted standby's last), a backup history file, a timeline history.
WAL_NAME = re.compile(r"^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?$|^[0-9A-F]{8}\.history$")
#: Snapshot name prefix: ``wal-NAME`` holds file ``wal/NAME``.
PREFIX = "wal-"


def check(name: str) -> str:
    """``name`` if it is a WAL file name Postgres archives (:data:`WAL_NAME`); InputError
    otherwise (a path, a typo, ``%p`` and ``%f`` swapped)."""
    if not WAL_NAME.match(name):
        raise InputError(
            f"{name!r} is not a WAL file name (24 hex digits, or a .history/.backup/.partial "
            "file): archive_command is `vaultfs wal push %p %f`, restore_command "
            "`vaultfs wal fetch %f %p`"
        )
    return name


def _chunks(vault: Vault, name: str) -> Iterator[bytes] | None:
    """The archived bytes of WAL file ``name`` (chunk by chunk), None when none is archived."""
    snap = snapshots.find(vault.index, PREFIX + name)
    if snap is None:
        return None
    rows = [r for r in snapshots.entries_on(vault.index, snap[0], [f"wal/{name}"]) if r[2] == "f"]
    return vault.iter_file(rows[0][0]) if rows else None


def push(vault: Vault, path: Path, name: str) -> bool:
    """Archive WAL file ``path`` as ``name``: commit it as file ``wal/NAME`` of a new snapshot
    ``wal-NAME`` and return True; return False when ``name`` is archived already with the same
    bytes (a retry). Placing it on the remotes is the caller's flush. IntegrityError when
    ``name`` is archived with other bytes; InputError for a bad name or an unreadable file."""
    check(name)
    try:
        f = path.open("rb")
    except OSError as e:
        raise InputError(f"cannot read WAL file {path}: {e.strerror}") from None
    with f:
        held = _chunks(vault, name)
        if held is None:
            backup_stream(vault, f, f"wal/{name}", name=PREFIX + name, upload=True)
            return True
        # compared chunk by chunk: a segment may be up to 1 GiB (initdb --wal-segsize)
        if all(f.read(len(c)) == c for c in held) and not f.read(1):
            return False
    raise IntegrityError(
        f"WAL file {name} is archived already with other contents: refusing to replace it "
        "(two servers archiving into one vault, or a timeline reused); archive this server "
        "into a vault of its own"
    )


def fetch(vault: Vault, name: str, dest: Path) -> None:
    """Write archived WAL file ``name`` to ``dest``: under a temporary name beside it, fsynced,
    then renamed, so Postgres never reads half a file. InputError (exit 18) when no snapshot
    holds it: for restore_command, the end of the archive. NotEnoughRemotes (exit 11) naming
    the remotes and the way forward when too few hold it (:meth:`ShardsUnavailable.as_seen`)."""
    check(name)
    chunks = _chunks(vault, name)
    if chunks is None:
        raise InputError(f"WAL file {name} is not in the vault")
    tmp = dest.with_name(f".{dest.name}.vaultfs-tmp")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, ShardsUnavailable):
            raise e.as_seen(f"fetch WAL file {name}") from None
        raise
