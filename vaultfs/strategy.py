"""The strategy file: tiers of copies (primary, NAS, offsite, archive …) and the sources they
back up, read from YAML and validated into a :class:`Strategy` (docs/operations.md "Tiers").

::

    backup_strategy:
      primary:   {backend: local_postgres, frequency: continuous}
      secondary: {backend: "nas:vault", frequency: hourly, retention: 30_days,
                  erasure_coding: 1_of_1}
      offsite:   {backends: ["b2:kb", "sftp-host:kb", "/mnt/usb/kb"], frequency: daily,
                  erasure_coding: 2_of_3, encryption: hybrid_pq, retention: 1_year}
    sources:
      - pg: {dsn: "postgresql:///kb"}
      - path: ~/notes

This module only reads, validates and edits the file (pure apart from reading and writing
it); vaultfs/tiers.py makes the tiers' vaults and runs them. An invalid file is a
:class:`~vaultfs.errors.ConfigError` (exit 2) with one line per problem (validation goes on
past a problem), each naming the file, the line and the key:
``strategy.yaml:4: offsite.erasure_coding: '3of5' is not K_of_N (e.g. 3_of_5)``.

Spellings accepted (anything else is an error):

- ``backend: SPEC`` or ``backends: [SPEC, ...]`` (not both): an rclone remote ``NAME:PATH``,
  a connection string ``:TYPE,OPTION=VALUE,...:PATH``, an absolute (or ``~``) local path, or
  ``local_postgres``: the live database itself (a tier that is its sources, not a vault;
  `vaultfs run` leaves it alone). A location belongs to one tier: another tier's backend in
  the same location or inside it (``/mnt/a`` and ``/mnt/a/b``; ``nas:kb`` and
  ``nas:kb/old``) is refused.
- ``erasure_coding: K_of_N``: N shards of every segment, each on another backend, so N is
  at most the number of backends (usually equal; more backends than N share the load and add
  no redundancy), 1 <= K < N <= 32, or ``1_of_1``: one whole copy (a 1-of-1 vault,
  erasure algorithm 3: the space of the data once, and nothing to rebuild a lost copy from).
  Default: 1_of_1 for one backend; required for more.
- ``frequency: continuous | hourly | daily | weekly | DURATION`` (``30m``, ``6h``, ``2d``,
  ``1w``, as `vaultfs schedule`). ``continuous`` is for ``local_postgres`` only.
- ``retention: permanent | N_UNIT`` (UNIT one of hours, days, weeks, months, years,
  singular allowed: ``30_days``, ``1_year``), or forget's options as one string
  (``"--keep-daily 7 --keep-weekly 4"``). ``N_UNIT`` keeps every snapshot within that span of
  the tier's newest one (``forget --keep-within``). Default: permanent.
- ``encryption: hybrid_pq`` (the X-Wing suite every new vault uses; the only value today).
- ``immutable: true | false`` (default false): recorded for the tier's vault
  (docs/operations.md).
- ``sources``: a list of ``{path: DIR}`` (``~`` expanded; relative to the strategy file's
  directory) and ``{pg: {dsn: DSN}}`` (dumped with pg_dump at each snapshot; ``pg_dump:
  PROGRAM`` picks the binary matching the server).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from . import erasure, retention
from .errors import ConfigError, InputError

#: The strategy file's name in the vault home, used when no ``--strategy`` is given.
DEFAULT_NAME = "strategy.yaml"
#: The backend spelling of the live database tier.
LIVE_POSTGRES = "local_postgres"
#: Where a tier's vault home lives, under the strategy's home.
TIERS_DIR = "tiers"

_TIER_KEYS = (
    "backend", "backends", "frequency", "retention", "erasure_coding", "encryption", "immutable",
)  # fmt: skip
_TIER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_REMOTE = re.compile(r"(?:[\w.-][\w. -]*|:[\w-]+(?:,[^:]*)?):.*")
_EC = re.compile(r"(\d+)_of_(\d+)")
_SPAN = re.compile(r"(\d+)_(hour|day|week|month|year)s?")
_FREQUENCY_WORDS = {"hourly": 3600.0, "daily": 86400.0, "weekly": 7 * 86400.0}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
ENCRYPTIONS = ("hybrid_pq",)


@dataclass(frozen=True)
class Tier:
    """One tier: a vault of its own (``home``) over ``backends`` with k-of-n coding, or the
    live database (:attr:`live`). ``frequency`` is seconds between snapshots (0: continuous);
    ``retention`` is None for permanent; ``retention_text`` is the spelling in the file."""

    name: str
    backends: tuple[str, ...]
    k: int
    n: int
    frequency: float
    retention: retention.Policy | None
    immutable: bool
    encryption: str
    home: Path
    frequency_text: str = ""
    retention_text: str = "permanent"

    @property
    def live(self) -> bool:
        """The live database itself: nothing to make, snapshot or prune."""
        return self.backends == (LIVE_POSTGRES,)

    @property
    def survives_losses(self) -> int:
        """How many backends the tier may lose and still restore (by design)."""
        return 0 if self.live else self.n - self.k

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "backends": list(self.backends),
            "k": self.k,
            "n": self.n,
            "frequency": self.frequency_text,
            "frequency_seconds": self.frequency,
            "retention": self.retention_text,
            "immutable": self.immutable,
            "encryption": self.encryption,
            "home": str(self.home),
            "live": self.live,
            "survives_losses": self.survives_losses,
        }


@dataclass(frozen=True)
class Source:
    """What a tier's snapshot holds: ``kind`` "path" (``value`` a directory) or "pg"
    (``value`` a libpq DSN, dumped with the ``pg_dump`` program: a name on PATH or a path,
    to match the server's major version)."""

    kind: str
    value: str
    pg_dump: str = "pg_dump"
    #: ``FILE:LINE: sources[I].KEY`` for messages about it (not part of its value)
    where: str = field(default="", compare=False)

    def problems(self) -> list[str]:
        """What the machine lacks to back this source up, one sentence each starting with
        :attr:`where`: a ``path`` that does not exist, a ``pg_dump`` program that is not
        there or not executable (the DSN itself is checked when the file is read)."""
        if self.kind == "path":
            if not os.path.exists(self.value):
                return [f"{self.where}: {self.value} does not exist"]
            return []
        found = shutil.which(self.pg_dump)
        if found is None:
            return [
                f"{self.where}: pg_dump program {self.pg_dump!r} is not found or not "
                "executable: install the server's major version's client tools or name it "
                "with pg_dump: PATH"
            ]
        return []

    def as_json(self) -> dict:
        if self.kind == "pg":
            return {"pg": {"dsn": self.value, "pg_dump": self.pg_dump}}
        return {self.kind: self.value}


@dataclass(frozen=True)
class Strategy:
    """A validated strategy file: tiers in file order, and the sources."""

    path: Path
    home: Path
    tiers: dict[str, Tier]
    sources: list[Source] = field(default_factory=list)

    def tier(self, name: str) -> Tier:
        """The tier called ``name``; InputError naming the tiers there are otherwise (``name``
        is a flag value the user typed, not a fault of the file: exit 18, not 2)."""
        if name not in self.tiers:
            raise InputError(
                f"{self.path}: no tier {name!r}; the tiers are {', '.join(self.tiers)}"
            )
        return self.tiers[name]

    def as_json(self) -> dict:
        return {
            "path": str(self.path),
            "home": str(self.home),
            "tiers": [t.as_json() for t in self.tiers.values()],
            "sources": [s.as_json() for s in self.sources],
        }


def default_path(home: Path) -> Path:
    """Where a vault home keeps its strategy file."""
    return home / DEFAULT_NAME


def _yaml() -> YAML:
    y = YAML()  # round trip: comments and key order survive an edit
    y.indent(mapping=2, sequence=4, offset=2)
    y.preserve_quotes = True
    y.width = 4096  # rewrapping a user's flow mappings would move every line number
    return y


def _read(path: Path) -> object:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(
            f"no strategy file {path}: write one (docs/operations.md, Tiers) or give --strategy"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read strategy file {path}: {e}") from None
    try:
        return _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{path}:{line} YAML syntax error: {e.problem or e.context}") from None
    except YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None


class _At:
    """Error messages that name the file, the line and the key path, and the problems found
    so far (:meth:`collect`): validation goes on past a problem so that one pass names every
    problem of the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Record a ConfigError raised in the ``with`` block as one more problem and go on."""
        try:
            yield
        except ConfigError as e:
            self.problems.append(e.message)

    def fail(self, node: object, key: str | int | None, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.at(node, key, where)}: {msg}")

    def line(self, message: str) -> int:
        """The line a message of :meth:`fail` names (0 when none): to list them in file order."""
        m = re.match(re.escape(str(self.path)) + r":(\d+):", message)
        return int(m.group(1)) if m else 0

    def at(self, node: object, key: str | int | None, where: str) -> str:
        """``FILE:LINE: KEY`` of ``key`` in ``node`` (the parts known)."""
        line = None
        if isinstance(node, CommentedMap) and key is not None and key in node:
            line = node.lc.key(key)[0]
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
            line = node.lc.item(key)[0]
        elif isinstance(node, CommentedMap | CommentedSeq):
            line = node.lc.line
        at = f"{self.path}:{line + 1}" if line is not None else str(self.path)
        return f"{at}: {where}" if where else at


def load(path: Path, home: Path) -> Strategy:
    """Read and validate the strategy file at ``path`` for the vault home ``home`` (tier
    homes go under ``home/tiers/``). Raises InputError when the file cannot be read and
    ConfigError when it is not a valid strategy: one line per problem (file, line, key)."""
    return parse(_read(path), path, home)


def check(path: Path, home: Path) -> tuple[Strategy | None, list[str]]:
    """Every problem of the strategy file at ``path``, one line each (file, line, key): what
    makes it invalid, then what this machine lacks to run it (:meth:`Source.problems` of the
    sources it could read); the Strategy when the file itself is valid. `vaultfs strategy
    check` reports them. InputError when the file cannot be read."""
    at = _At(path)
    tiers, sources = _parse(at, _read(path), home)
    machine = [p for src in sources for p in src.problems()]
    valid = None if at.problems else Strategy(path, home, tiers, sources)
    return valid, sorted(at.problems, key=at.line) + machine


def parse(doc: object, path: Path, home: Path) -> Strategy:
    """Validate a loaded YAML document (see :func:`load`)."""
    at = _At(path)
    tiers, sources = _parse(at, doc, home)
    if at.problems:
        raise ConfigError("\n".join(sorted(at.problems, key=at.line)))
    return Strategy(path, home, tiers, sources)


def _parse(at: _At, doc: object, home: Path) -> tuple[dict[str, Tier], list[Source]]:
    """The tiers and sources of ``doc`` that are valid; every problem goes to ``at``."""
    if not isinstance(doc, CommentedMap):
        with at.collect():
            raise at.fail(doc, None, "", "a strategy file is a mapping with backup_strategy:")
        return {}, []
    for key in doc:
        if key not in ("backup_strategy", "sources"):
            with at.collect():
                raise at.fail(
                    doc, key, str(key), "unknown key: the file holds backup_strategy and sources"
                )
    tiers: dict[str, Tier] = {}
    tiers_doc = doc.get("backup_strategy")
    with at.collect():
        if "backup_strategy" not in doc:
            raise at.fail(doc, None, "backup_strategy", "missing: name the tiers under it")
        if not isinstance(tiers_doc, CommentedMap) or not tiers_doc:
            raise at.fail(doc, "backup_strategy", "backup_strategy", "must map tier names to tiers")
        tiers = _tiers(at, tiers_doc, home)
    sources = _sources(at, doc, at.path.parent)
    if not sources and tiers and not all(t.live for t in tiers.values()) and not at.problems:
        with at.collect():
            raise at.fail(doc, None, "sources", "missing: list what the tiers back up (path:, pg:)")
    return tiers, sources


def _tiers(at: _At, tiers_doc: CommentedMap, home: Path) -> dict[str, Tier]:
    """The valid tiers of ``tiers_doc``, each checked against those before it: one location
    (or one inside another's) for two tiers is refused."""
    tiers: dict[str, Tier] = {}
    located: dict[str, tuple[str, ...]] = {}  # the backends of every tier read so far
    for name in tiers_doc:
        with at.collect():
            if not isinstance(name, str) or not _TIER_NAME.fullmatch(name):
                raise at.fail(
                    tiers_doc, name, str(name),
                    "a tier name is lower-case letters, digits, - and _, starting with a letter",
                )  # fmt: skip
            backends, tier = _tier(at, tiers_doc, name, home / TIERS_DIR / name)
            clashes = [(o, c) for o, theirs in located.items() if (c := _overlap(theirs, backends))]
            located[name] = backends
            for other, (a, b) in clashes:  # two vaults in one location would take each
                how = {  # other's objects for foreign ones (repair quarantines them)
                    0: f"is also a backend of tier {other}",
                    1: f"is inside {a}, a backend of tier {other}",
                    -1: f"holds {a}, a backend of tier {other}",
                }[_inside(b, a) or 0]
                with at.collect():
                    raise at.fail(
                        tiers_doc, name, f"{name}.backends",
                        f"{b} {how}: each tier needs locations of its own, none inside "
                        "another's",
                    )  # fmt: skip
            if tier is not None:
                tiers[name] = tier
    if sum(t.live for t in tiers.values()) > 1:
        with at.collect():
            raise at.fail(
                tiers_doc, None, "backup_strategy", f"only one tier may be {LIVE_POSTGRES}"
            )
    return tiers


def _location(spec: str) -> tuple[str, tuple[str, ...]]:
    """(remote, path parts) of a backend spec: the remote is "" for a local path, the name
    for ``NAME:PATH``, the backend and options for ``:TYPE,...:PATH`` (as rclone splits
    them, and :attr:`vaultfs.remotes.Remote.label`)."""
    if spec.startswith(":"):
        remote, _, path = spec.rpartition(":")
    elif ":" in spec and "/" not in spec.split(":", 1)[0]:
        remote, _, path = spec.partition(":")
    else:
        remote, path = "", spec
    return remote, tuple(p for p in path.split("/") if p not in ("", "."))


def _inside(a: str, b: str) -> int | None:
    """Whether backend ``a`` is in ``b``'s location: 0 the same, 1 inside it, -1 holding it,
    None apart (the live database is no location)."""
    if LIVE_POSTGRES in (a, b):
        return None
    (ra, pa), (rb, pb) = _location(a), _location(b)
    short = min(len(pa), len(pb))
    if ra != rb or pa[:short] != pb[:short]:
        return None
    return (len(pa) > len(pb)) - (len(pa) < len(pb))


def _overlap(theirs: tuple[str, ...], mine: tuple[str, ...]) -> tuple[str, str] | None:
    """The first (their backend, my backend) that share a location or one inside the other
    (:func:`_inside`), else None."""
    return next(((a, b) for a in theirs for b in mine if _inside(b, a) is not None), None)


def _tier(
    at: _At, parent: CommentedMap, name: str, home: Path
) -> tuple[tuple[str, ...], Tier | None]:
    """The backends of tier ``name`` of ``parent`` (empty when they are invalid) and the
    tier, None when it has problems (each recorded in ``at``)."""
    before = len(at.problems)
    doc = parent[name]
    if not isinstance(doc, CommentedMap):
        raise at.fail(parent, name, name, "a tier is a mapping (backend:, frequency:, ...)")
    for key in doc:
        if key not in _TIER_KEYS:
            with at.collect():
                raise at.fail(
                    doc, key, f"{name}.{key}", f"unknown key; a tier takes {', '.join(_TIER_KEYS)}"
                )
    backends: tuple[str, ...] = ()
    with at.collect():
        backends = _backends(at, parent, name)
    live = backends == (LIVE_POSTGRES,)
    frequency = 0.0
    with at.collect():
        freq_text = str(doc.get("frequency", ""))
        if "frequency" not in doc:
            raise at.fail(parent, name, f"{name}.frequency", "missing (hourly, daily, 6h, ...)")
        frequency = _frequency(at, doc, name, freq_text, live)
    if live:
        for extra in ("retention", "erasure_coding", "encryption", "immutable"):
            if extra in doc:
                with at.collect():
                    raise at.fail(
                        doc, extra, f"{name}.{extra}", f"does not apply to the live {LIVE_POSTGRES}"
                    )
        if len(at.problems) > before:
            return backends, None
        return backends, Tier(name, backends, 1, 1, frequency, None, False, "", home, freq_text, "")
    k = n = 1
    if backends:
        with at.collect():
            k, n = _coding(at, parent, name, len(backends))
    ret_text = str(doc.get("retention", "permanent"))
    policy = None
    with at.collect():
        policy = _retention(at, doc, name, ret_text)
    enc = str(doc.get("encryption", ENCRYPTIONS[0]))
    if enc not in ENCRYPTIONS:
        with at.collect():
            raise at.fail(
                doc, "encryption", f"{name}.encryption",
                f"{enc!r} is not offered: use {' or '.join(ENCRYPTIONS)} (other suites: "
                "`vaultfs reencrypt` on the tier)",
            )  # fmt: skip
    immutable = doc.get("immutable", False)
    if not isinstance(immutable, bool):
        with at.collect():
            raise at.fail(doc, "immutable", f"{name}.immutable", "true or false")
    if len(at.problems) > before:
        return backends, None
    tier = Tier(name, backends, k, n, frequency, policy, immutable, enc, home, freq_text, ret_text)
    return backends, tier


def _backends(at: _At, parent: CommentedMap, name: str) -> tuple[str, ...]:
    """The backends of tier ``name`` (ConfigError on the first problem: the rest of the tier
    is still checked)."""
    doc = parent[name]
    if ("backend" in doc) == ("backends" in doc):
        raise at.fail(parent, name, f"{name}.backend", "give exactly one of backend: or backends:")
    key = "backend" if "backend" in doc else "backends"
    raw = doc[key]
    listed = [raw] if key == "backend" else raw
    if not isinstance(listed, list) or not listed:
        raise at.fail(doc, key, f"{name}.{key}", "a list of one or more backends")
    if key == "backend":
        backends = (_backend(at, doc, key, f"{name}.backend", raw),)
    else:
        backends = tuple(_backend(at, raw, i, f"{name}.backends", b) for i, b in enumerate(raw))
    if len(set(backends)) != len(backends):
        raise at.fail(doc, key, f"{name}.{key}", "the same backend is listed twice")
    if LIVE_POSTGRES in backends and backends != (LIVE_POSTGRES,):
        raise at.fail(doc, key, f"{name}.{key}", f"{LIVE_POSTGRES} stands alone in its tier")
    return backends


def _backend(at: _At, node: object, key: str | int, where: str, spec: object) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise at.fail(node, key, where, "a backend is a string")
    spec = spec.strip()
    if spec == LIVE_POSTGRES or _REMOTE.fullmatch(spec):
        return spec
    if spec.startswith(("/", "~")):
        return str(Path(spec).expanduser())
    raise at.fail(
        node, key, where,
        f"{spec!r} is not a backend: use an rclone remote NAME:PATH, a connection string "
        f":TYPE,OPTION=VALUE:PATH, an absolute path, or {LIVE_POSTGRES}",
    )  # fmt: skip


def _frequency(at: _At, doc: CommentedMap, name: str, text: str, live: bool) -> float:
    where = f"{name}.frequency"
    if text == "continuous":
        if not live:
            raise at.fail(
                doc, "frequency", where,
                f"continuous is for the live {LIVE_POSTGRES} tier; a vault tier takes hourly, "
                "daily, weekly or a duration such as 15m",
            )  # fmt: skip
        return 0.0
    if text in _FREQUENCY_WORDS:
        return _FREQUENCY_WORDS[text]
    m = re.fullmatch(r"(\d+)([smhdw])", text)
    if not m or int(m.group(1)) == 0:
        raise at.fail(
            doc, "frequency", where,
            f"{text!r} is not a frequency: continuous, hourly, daily, weekly or a duration "
            "such as 30m, 6h, 2d",
        )  # fmt: skip
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def _coding(at: _At, parent: CommentedMap, name: str, backends: int) -> tuple[int, int]:
    where = f"{name}.erasure_coding"
    doc = parent[name]
    if "erasure_coding" not in doc:
        if backends == 1:
            return 1, 1
        raise at.fail(
            parent, name, where, f"missing: {backends} backends need K_of_{backends} (e.g. "
            f"{max(1, backends // 2)}_of_{backends})",
        )  # fmt: skip
    text = str(doc["erasure_coding"])
    m = _EC.fullmatch(text)
    if not m:
        raise at.fail(doc, "erasure_coding", where, f"{text!r} is not K_of_N (e.g. 3_of_5)")
    k, n = int(m.group(1)), int(m.group(2))
    if n > backends:
        raise at.fail(
            doc, "erasure_coding", where,
            f"{text} writes {n} shards but the tier lists {backends} backend(s): N is at most "
            "the number of backends",
        )  # fmt: skip
    try:
        erasure.validate(k, n)
    except ValueError as e:
        raise at.fail(doc, "erasure_coding", where, f"{text}: {e}") from None
    return k, n


def _retention(at: _At, doc: CommentedMap, name: str, text: str) -> retention.Policy | None:
    where = f"{name}.retention"
    if text == "permanent":
        return None
    if m := _SPAN.fullmatch(text):
        count, unit = int(m.group(1)), m.group(2)
        if count == 0:
            raise at.fail(doc, "retention", where, "a span of 0 keeps nothing: use 1 or more")
        if unit in ("hour", "week"):
            count, unit = (count * 7, "day") if unit == "week" else (count, unit)
        d = {"hour": "h", "day": "d", "month": "m", "year": "y"}[unit]
        return retention.Policy(within=retention.Duration.parse(f"{count}{d}"))
    if text.startswith("--keep-"):
        try:
            return retention.Policy.from_args(text.split())
        except ValueError as e:
            raise at.fail(doc, "retention", where, str(e)) from None
    raise at.fail(
        doc, "retention", where,
        f"{text!r} is not a retention: permanent, N_days/N_weeks/N_months/N_years (e.g. "
        "30_days) or forget's options (\"--keep-daily 7 --keep-weekly 4\")",
    )  # fmt: skip


def _sources(at: _At, doc: CommentedMap, base: Path) -> list[Source]:
    """The valid sources of ``doc``; every problem goes to ``at``."""
    raw = doc.get("sources")
    if raw is None:
        return []
    if not isinstance(raw, CommentedSeq):
        with at.collect():
            raise at.fail(doc, "sources", "sources", "a list of {path: DIR} and {pg: {dsn: DSN}}")
        return []
    out = []
    for i, item in enumerate(raw):
        with at.collect():
            out.append(_source(at, raw, i, item, base))
    return out


def _source(at: _At, raw: CommentedSeq, i: int, item: object, base: Path) -> Source:
    """Source ``i`` of the list ``raw`` (ConfigError naming its line and key otherwise)."""
    where = f"sources[{i}]"
    if not isinstance(item, CommentedMap) or len(item) != 1:
        raise at.fail(raw, i, where, "one of {path: DIR} or {pg: {dsn: DSN}}")
    ((kind, value),) = item.items()
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise at.fail(item, kind, where + ".path", "a directory")
        path_at = at.at(item, kind, where + ".path")
        return Source("path", str(base / Path(value).expanduser()), where=path_at)
    if kind == "pg":
        if not isinstance(value, CommentedMap):
            raise at.fail(item, kind, where + ".pg", "needs {dsn: DSN}")
        for key in value:
            if key not in ("dsn", "pg_dump"):
                raise at.fail(value, key, f"{where}.pg.{key}", "unknown key: dsn, pg_dump")
        dsn, tool = value.get("dsn"), value.get("pg_dump", "pg_dump")
        if not isinstance(dsn, str) or not dsn:
            raise at.fail(item, kind, where + ".pg.dsn", "missing: the database's DSN")
        import psycopg  # a tenth of a second to import; only a pg source needs it
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as e:
            raise at.fail(value, "dsn", where + ".pg.dsn", f"not a libpq DSN: {e}") from None
        if not isinstance(tool, str) or not tool:
            raise at.fail(value, "pg_dump", where + ".pg.pg_dump", "a program name or path")
        tool = str(Path(tool).expanduser()) if "/" in tool else tool
        tool_at = at.at(value, "pg_dump" if "pg_dump" in value else "dsn", where + ".pg")
        return Source("pg", dsn, tool, where=tool_at)
    raise at.fail(item, kind, where, f"unknown source {kind!r}: use path or pg")


def add_backend(
    path: Path, home: Path, tier: str, spec: str, keep: tuple[int, int] | None = None
) -> Strategy:
    """Add ``spec`` to ``tier``'s backends in the file at ``path``, keeping its comments,
    order and layout (a ``backend:`` becomes ``backends:``). K_of_N grows N by one, keeping
    K, unless ``keep`` is the (k, n) of the tier's made vault: a vault's k-of-n is fixed when
    it is made, so the file then says ``keep`` over one more backend (N below the number of
    backends: the new one shares the load, `vaultfs remote add` spreads the vault over it).
    The edit is made in the text itself (:func:`_spliced`) so that a flow mapping written
    over several lines keeps its lines; where that cannot be done (a value written over
    several lines), the round-trip dump writes such a flow collection on one line. The
    edited file is validated before it replaces the old one (atomically); the new
    Strategy."""
    text = path.read_text() if path.exists() else ""
    doc = _read(path)
    current = parse(doc, path, home)
    t = current.tier(tier)
    if t.live:
        raise InputError(f"{path}: {tier}: the live {LIVE_POSTGRES} tier takes no backends")
    assert isinstance(doc, CommentedMap)
    node = doc["backup_strategy"][tier]
    coding = None
    if keep is not None:
        coding = f"{keep[0]}_of_{keep[1]}"
    elif "erasure_coding" in node:
        coding = f"{t.k}_of_{t.n + 1}"
    elif t.n == 1:
        coding = "1_of_2"
    edited = _spliced(text, node, spec, coding)
    if "backend" in node:
        pos = list(node).index("backend")
        node.insert(pos, "backends", CommentedSeq([node.pop("backend")]))
        node["backends"].fa.set_flow_style()
    node["backends"].append(spec)
    if coding is not None:
        node["erasure_coding"] = coding
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    new = parse(_yaml().load(buf.getvalue()), path, home)
    if edited is not None:  # the same edit, or the round trip's text when it is not
        try:
            same = parse(_yaml().load(edited), path, home) == new
        except (ConfigError, YAMLError):
            same = False
        if same:
            buf = io.StringIO(edited)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)
    return new


def _spliced(text: str, node: CommentedMap, spec: str, coding: str | None) -> str | None:
    """``text`` with ``spec`` added to the backends of the tier ``node`` (read from it) and
    its erasure_coding set to ``coding`` (when not None), changing only those values' own
    characters; None when a value is not where and how this can edit it (the caller then
    dumps the round-tripped document)."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))
    flow = node.fa.flow_style()
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in text offsets
    item = json.dumps(spec)  # a YAML double-quoted scalar
    try:
        if "backend" in node:
            kl, kc = node.lc.key("backend")
            vl, vc = node.lc.value("backend")
            v0 = starts[vl] + vc
            v1 = _scalar_end(text, v0, flow)
            edits.append((starts[kl] + kc, starts[kl] + kc + len("backend"), "backends"))
            edits.append((v0, v1, f"[{text[v0:v1]}, {item}]"))
            after_backends = v1
        else:
            seq = node["backends"]
            il, ic = seq.lc.item(len(seq) - 1)
            i0 = starts[il] + ic
            i1 = _scalar_end(text, i0, flow or seq.fa.flow_style())
            if seq.fa.flow_style():
                edits.append((i1, i1, f", {item}"))
                after_backends = text.index("]", i1) + 1
            else:  # a block sequence: one more "- item" line under the last
                dash = text.rindex("-", starts[il], i0)
                eol = starts[il + 1] if il + 1 < len(lines) else len(text)
                nl = "" if text[eol - 1 : eol] == "\n" else "\n"
                edits.append((eol, eol, f"{nl}{text[starts[il] : dash]}- {item}\n"))
                after_backends = -1
        if coding is not None and "erasure_coding" in node:
            vl, vc = node.lc.value("erasure_coding")
            v0 = starts[vl] + vc
            edits.append((v0, _scalar_end(text, v0, flow), coding))
        elif coding is not None:
            if flow and after_backends >= 0:
                edits.append((after_backends, after_backends, f", erasure_coding: {coding}"))
            elif not flow:  # a line of its own before the tier's first key
                kl, kc = node.lc.key(next(iter(node)))
                edits.append((starts[kl], starts[kl], f"{' ' * kc}erasure_coding: {coding}\n"))
            else:
                return None
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    for e0, e1, rep in sorted(edits, reverse=True):
        text = text[:e0] + rep + text[e1:]
    return text


def _scalar_end(text: str, i: int, flow: bool) -> int:
    """The offset just past the scalar that starts at ``i`` on one line (quoted or plain;
    a plain one in a flow collection ends at ``,``, ``]`` or ``}``). ValueError for a
    scalar that goes on to the next line (the caller gives up)."""
    eol = text.find("\n", i)
    eol = len(text) if eol < 0 else eol
    if text[i] == '"':
        j = i + 1
        while j < eol and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        if j >= eol:
            raise ValueError("a double-quoted scalar over several lines")
        return j + 1
    if text[i] == "'":
        j = i + 1
        while j < eol and (text[j] != "'" or text[j + 1 : j + 2] == "'"):
            j += 2 if text[j] == "'" else 1
        if j >= eol:
            raise ValueError("a single-quoted scalar over several lines")
        return j + 1
    m = re.compile(
        r"[^\n]*?(?=\s+#|\s*$)" if not flow else r"[^,\]}\n]*?(?=\s+#|\s*[,\]}]|\s*$)", re.M
    ).match(text, i)
    if m is None or m.end() == i:
        raise ValueError("no scalar here")
    return m.end()
