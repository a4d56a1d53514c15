"""Connections to the live knowledge-base database: one place that turns a DSN into a psycopg
connection and every way that can fail into an error the user can act on.

Contract: :func:`connect` never lets a psycopg exception out for a bad, unreachable or
refusing DSN; it raises :class:`~vaultfs.errors.InputError` (exit 18) with the DSN shown by
:func:`redact_dsn` (no password, ever). Queries on the returned connection may still raise
psycopg errors; :func:`schema_errors` maps the "no such table / column" family and
:func:`one_line` makes any of them one line for a message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from psycopg import conninfo

from ..errors import InputError

#: Seconds to wait for the server before saying it is unreachable.
CONNECT_TIMEOUT = 10
#: Characters of a server error's detail kept in a message.
DETAIL_MAX = 160


def redact_dsn(dsn: str) -> str:
    """``dsn`` in key=value form without its password (for messages and provenance); a DSN
    that does not parse becomes a fixed placeholder, never the raw text (it may hold one)."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    params.pop("password", None)
    return conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})


def connect(dsn: str, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection to ``dsn``; InputError (with the redacted DSN) when it is malformed,
    unreachable or refuses us."""
    try:
        conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise InputError(f"malformed DSN {redact_dsn(dsn)}: {one_line(e)}") from None
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as e:
        raise InputError(
            f"cannot connect to the database {redact_dsn(dsn)}: {one_line(e)}; check --dsn "
            "or $VAULTFS_DSN and that the server is running"
        ) from None


@contextlib.contextmanager
def schema_errors(what: str) -> Iterator[None]:
    """Turn a missing table or column (a database without the expected schema) into an
    InputError that names ``what`` was expected."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as e:
        raise InputError(f"{what}: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
    """A psycopg error as one line for a user: the server's message and its detail (the key
    that clashed, the row that failed), never the multi-line text with its hints."""
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    detail = " ".join((getattr(diag, "message_detail", None) or "").split())
    if len(detail) > DETAIL_MAX:  # "Failing row contains (...)" holds a whole row
        detail = detail[: DETAIL_MAX - 1] + "…"
    return " ".join(primary.split()) + (f" ({detail})" if detail else "")
