"""File names: how a Linux name (any bytes but '/' and NUL) is stored in the index and shown.

A path or symlink target goes into a TEXT-affinity column of the index in its **canonical
form**: a TEXT value (the bytes decoded as UTF-8) when the bytes are valid UTF-8, else a BLOB
value holding the raw bytes. Every byte string has exactly one canonical form, so
``UNIQUE (snapshot, path)`` and ``path = ?`` keep working and an index written before this
rule (all TEXT) means the same thing. Readers turn either form back into bytes with
:func:`from_db`. docs/format.md section 9 describes it for readers without vaultfs.

Extended-attribute names are stored in the ``xattrs`` JSON column: a JSON object
``{name: hex value}`` when every name is valid UTF-8 (unchanged), else a JSON array
``[[hex name, hex value], ...]``; the JSON type tells the two apart.

Inside vaultfs a path is carried as ``str`` in Python's file-system form (``os.fsdecode``:
undecodable bytes become lone surrogates), the form ``os.listdir`` returns and every ``os``
call takes back; :func:`to_db` and :func:`fs_path` convert at the index boundary.

For people, :func:`display` escapes a name C-style (``\\\\``, ``\\n``, ``\\t``, ``\\xNN`` for
other control bytes and bytes that are not UTF-8), which is unambiguous and one line.
"""

from __future__ import annotations

import json
import os
import stat

DbText = str | bytes  # a canonical value as stored in (and read back from) SQLite


def raw(path: str | bytes) -> bytes:
    """The bytes of a path given in file-system form (str) or as bytes."""
    return path if isinstance(path, bytes) else os.fsencode(path)


def to_db(path: str | bytes) -> DbText:
    """The canonical index value of a path: TEXT if its bytes are UTF-8, else a BLOB."""
    b = raw(path)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def from_db(value: DbText) -> bytes:
    """The bytes of a path read from the index (either canonical form)."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def fs_path(value: DbText) -> str:
    """A path read from the index in file-system form, for ``os`` calls and comparisons."""
    return os.fsdecode(from_db(value))


def is_text(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_ESC = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}


def display(path: str | bytes) -> str:
    """One printable line for a name: C-style escapes for '\\\\', control characters and
    bytes that are not UTF-8; everything else as is."""
    b = raw(path)
    out = []
    for ch in b.decode("utf-8", "surrogateescape"):
        c = ord(ch)
        if c in _ESC:
            out.append(_ESC[c])
        elif 0xDC80 <= c <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{c - 0xDC00:02x}")
        elif c < 0x20 or c == 0x7F:
            out.append(f"\\x{c:02x}")
        else:
            out.append(ch)
    return "".join(out)


def json_fields(key: str, value: DbText | None) -> dict:
    """``--json`` fields for a name: ``key`` is the text (undecodable bytes as lone
    surrogates, U+DC80 + byte, as Python's ``os.fsdecode`` gives) and, only when the name is
    not valid UTF-8, ``key + '_hex'`` holds its exact bytes."""
    if value is None:
        return {key: None}
    b = from_db(value)
    out: dict = {key: b.decode("utf-8", "surrogateescape")}
    if not is_text(b):
        out[key + "_hex"] = b.hex()
    return out


def xattrs_to_db(xattrs: dict[str, bytes] | dict[bytes, bytes] | None) -> str | None:
    """The ``entries.xattrs`` JSON of a {name: value} map (names as str or bytes)."""
    if not xattrs:
        return None
    items = sorted((raw(k), v) for k, v in xattrs.items())
    if all(is_text(k) for k, _v in items):
        return json.dumps({k.decode("utf-8"): v.hex() for k, v in items})
    return json.dumps([[k.hex(), v.hex()] for k, v in items])


def xattrs_from_db(text: str | None) -> dict[bytes, bytes]:
    """{name bytes: value bytes} from ``entries.xattrs`` (object or array form)."""
    if not text:
        return {}
    doc = json.loads(text)
    if isinstance(doc, dict):
        return {from_db(k): bytes.fromhex(v) for k, v in doc.items()}
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in doc}


def split_path(path: bytes) -> tuple[bytes, bytes] | None:
    """(directory, name) of a valid relative snapshot path (directory b"" at the top), or
    None for a path no directory can hold: absolute, empty, with '.', '..', '' parts or NUL."""
    if not path or b"\0" in path:
        return None
    head, _sep, tail = path.rpartition(b"/")
    if any(part in (b"", b".", b"..") for part in path.split(b"/")):
        return None
    return head, tail


#: entries.type of the special files a snapshot keeps, by file type (they hold no data)
SPECIAL_TYPES = {stat.S_IFIFO: "p", stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFSOCK: "s"}


#: the most bytes of a snapshot name: it is also a directory name under ``.snapshots/``
SNAPSHOT_NAME_MAX = 255


def check_snapshot_name(name: str) -> None:
    """InputError unless ``name`` can label a snapshot: 1 to 255 bytes of UTF-8 without
    ``/`` or control characters (it is a directory name under ``.snapshots/`` and one line in
    listings), not starting with ``.`` (there it would be hidden, or be ``.``, ``..`` or
    ``.snapshots`` inside itself), not ``latest``, and not shaped like a snapshot id (eight
    hex digits), which commands would then read as the other snapshot's."""
    from .errors import InputError

    size = len(name.encode("utf-8", "surrogateescape"))
    if not 1 <= size <= SNAPSHOT_NAME_MAX:
        raise InputError(f"a snapshot name has 1 to {SNAPSHOT_NAME_MAX} bytes, not {size}")
    if "/" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InputError(f"invalid snapshot name {display(name)!r}: no '/' or control characters")
    if name.startswith("."):
        raise InputError(
            f"invalid snapshot name {display(name)!r}: it cannot start with '.' (a hidden "
            "entry under .snapshots/)"
        )
    if name == "latest":
        raise InputError(f"{name!r} cannot name a snapshot")
    if len(name) == 8 and all(c in "0123456789abcdef" for c in name):
        raise InputError(
            f"{name!r} looks like a snapshot id (eight hex digits); choose another name"
        )
