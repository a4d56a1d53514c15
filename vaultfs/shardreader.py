"""The shard reader: fetch k verified shard objects of one segment, unwhiten and decode them,
widen the set when a subset fails, and name the shards (and the remotes holding them) that
lied.

Every path that needs a segment's plaintext goes through :func:`read_segment`: the vault's read
path (``Vault.segment_bytes``: the mount, prune, key rotation) and restore (the index copy
and, inside the decoder processes, every data segment). Repair's rebuild goes through
:func:`rebuild_fragments`, the same reader ending in a reconstruction of the missing
fragments instead of a decode. Verify checks shards without decoding and shares only
:func:`intact`.

The caller says what the segment should be made of (one :class:`ShardRef` per shard it may
fetch, with the BLAKE3 hash the index or signed manifest records), how it was coded (k, n, the
erasure algorithm), the audit key its objects are whitened under, and how to fetch shard objects
(a :class:`Transport`: restore's staging area or in-place reads, repair's backends, the vault's
remotes and upload queue). The reader owns the order of preference, the check of every object,
the decoding and the widening; it never writes, deletes or marks anything: the caller acts on
the :class:`Lie` records it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from . import erasure, segment
from .errors import IntegrityError, NotEnoughRemotes

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShardRef:
    """One shard object the caller expects to be able to fetch.

    ``hash`` is the BLAKE3 hash of the whole stored object (header and whitened fragment) as
    the index or the signed manifest records it: an object with that hash is exactly the
    object written, so it proves header, fragment and (through the index's Merkle records) the
    segment root. ``idx`` and ``name`` are the object's identity, which its whitening is keyed
    by (docs/format.md 7.1).
    ``holder`` names where it is read from, for messages (a remote's label, "the upload queue");
    ``local`` marks a copy on this machine (read first); ``tag`` is the caller's own handle
    (repair's shard row), carried back in :class:`Lie`. ``size`` is the object's length as the
    same signed metadata records it, when the caller has it: an object of another length is
    refused unhashed, and a transport uses it to bound its read (never more than ``size + 1``
    bytes, enough to tell that an object is longer)."""

    idx: int
    name: str
    hash: bytes
    holder: str = ""
    local: bool = False
    tag: Any = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Lie:
    """A shard that did not deliver what the index records: ``corrupt`` (an object came back
    whose hash is wrong) or ``missing`` (the transport could not produce it; ``detail`` says
    why when it knows)."""

    ref: ShardRef
    kind: Literal["corrupt", "missing"]
    detail: str = ""

    @property
    def reason(self) -> str:
        """Why the shard could not be had, without the remote and object a transport's
        detail names ("R: read X failed: why")."""
        return self.detail.split(" failed: ", 1)[-1] if self.detail else f"{self.kind} shard"

    def __str__(self) -> str:
        where = f" on {self.ref.holder}" if self.ref.holder else ""
        why = f" ({self.detail})" if self.detail else ""
        return f"shard {self.ref.name} (index {self.ref.idx}){where} is {self.kind}{why}"


@dataclass
class Decoded:
    """A segment's plaintext and the shards found lying on the way to it."""

    data: bytes
    lies: list[Lie] = field(default_factory=list)


@dataclass
class Rebuilt:
    """Rebuilt plain fragments {index: fragment} of a segment, and the shards found lying on
    the way to them."""

    fragments: dict[int, bytes]
    lies: list[Lie] = field(default_factory=list)


class ShardsUnavailable(NotEnoughRemotes):
    """Fewer than k shards of a segment could be fetched intact; :attr:`lies` names the ones
    that failed, so the caller can still report them; ``have`` intact of the ``need`` (k)
    wanted, and ``intact_on`` the holders that gave them, for a caller that says it in the
    user's terms (:meth:`for_user`)."""

    def __init__(
        self,
        message: str,
        lies: list[Lie] | None = None,
        have: int = 0,
        need: int = 0,
        intact_on: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.lies = lies or []
        self.have = have
        self.need = need
        self.intact_on = intact_on or []

    def __reduce__(self) -> tuple:  # crosses from restore's decoder processes intact
        return type(self), (self.message, self.lies, self.have, self.need, self.intact_on)

    def for_user(
        self,
        doing: str,
        held: Sequence[str],
        down: Sequence[str],
        empty: Sequence[str] = (),
        more: str = "",
        again: str = "run again",
    ) -> NotEnoughRemotes:
        """The same refusal (exit 11) in the user's terms, the one wording of every path
        that meets it (restore, the mount's reads): what could not be done (``doing``, e.g.
        "restore snapshot monday"), the remotes holding the vault (``held``), found empty
        (``empty``) and unreachable or failing (``down``, each with its reason), and the way
        forward (bring back remotes, ``more`` ways to add one; then ``again``; `vaultfs
        verify` names what is lost and `vaultfs repair` rebuilds it). A shard that came back
        corrupt is named with the remote that served it (its holder). The internal segment
        stays at the end."""
        need = self.need
        corrupt = [
            f"{lie.ref.holder or 'a remote'} (shard {lie.ref.name}, index {lie.ref.idx})"
            for lie in self.lies
            if lie.kind == "corrupt"
        ]
        return NotEnoughRemotes(
            f"cannot {doing}: it needs shards from {need} remotes and {self.have} gave "
            f"them intact. Holding the vault: {', '.join(held) or 'none'}"
            + (f"; empty (lost, or the wrong path): {', '.join(empty)}" if empty else "")
            + (f"; unreachable or failing: {', '.join(down)}" if down else "")
            + (f"; served a corrupt shard: {', '.join(corrupt)}" if corrupt else "")
            + f". Bring back remotes{more} until {need} hold it and {again}; with {need} "
            f"back, `vaultfs verify` names what is lost and `vaultfs repair` rebuilds it "
            f"({self.message})"
        )

    def as_seen(self, doing: str, again: str = "run again") -> NotEnoughRemotes:
        """:meth:`for_user` for a reader that asked only the remotes holding the segment's
        shards (the mount, `wal fetch`), not every remote: those that gave intact shards
        hold the vault, those that failed are named with their reason."""
        return self.for_user(
            doing,
            held=self.intact_on,
            down=[f"{lie.ref.holder} ({lie.reason})" for lie in self.lies if lie.kind != "corrupt"],
            again=again,
        )


class ShardsUndecodable(IntegrityError):
    """Every intact shard within reach was tried and they still do not decode."""

    def __init__(self, message: str, lies: list[Lie] | None = None) -> None:
        super().__init__(message)
        self.lies = lies or []

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.lies)


class Transport(Protocol):
    """How the reader gets shard objects: the one thing each caller supplies."""

    def fetch(self, refs: Sequence[ShardRef]) -> Mapping[str, segment.Body | str]:
        """Fetch the listed objects, unverified. Returns {name: object} for those it got
        (either form of :data:`segment.Body`); a name mapped to a ``str`` could not be had for
        the reason given; a name left out is missing for no stated reason. May be called
        several times for one segment, never twice with the same shard. Raises nothing for a
        shard it cannot fetch. Where a ref carries a ``size``, reads at most ``size + 1`` bytes
        of that object (a remote may serve anything under a listed name)."""
        ...


def preference(ref: ShardRef, k: int) -> tuple[bool, bool, int]:
    """Sort key: local copies first (no transfer), then data fragments (decoding them is a
    copy), then by index."""
    return (not ref.local, ref.idx >= k, ref.idx)


def choose(refs: Sequence[ShardRef], k: int) -> list[ShardRef]:
    """The k shards :func:`read_segment` fetches first, for callers that fetch them ahead in
    bulk (restore's and repair's batches) and hand them over through their transport."""
    return sorted(refs, key=lambda r: preference(r, k))[:k]


def intact(body: segment.Body, expected_hash: bytes, expected_size: int | None = None) -> bool:
    """Whether a fetched object is exactly the one the index records (its size first, when
    given, so a truncated object costs no hashing)."""
    if expected_size is not None:
        got = len(body[0]) + len(body[1]) if isinstance(body, tuple) else len(body)
        if got != expected_size:
            return False
    return segment.body_hash(body) == expected_hash


def read_segment(
    refs: Sequence[ShardRef],
    k: int,
    n: int,
    size: int,
    transport: Transport,
    what: str,
    *,
    alg: int,
    audit_key: bytes,
) -> Decoded:
    """Decode one segment of ``size`` bytes, coded k-of-n with erasure algorithm ``alg``, from
    the shards in ``refs``, whose stored objects are whitened under ``audit_key``.

    Fetches the k preferred shards (:func:`preference`), then, for each one missing or
    corrupt, the next ones in order until k are intact; each intact object is unwhitened
    (:func:`segment.open_fragment`, on the calling thread: never call this from the FUSE
    loop). If those k do not decode (a singular subset, possible with erasure algorithm 1),
    adds intact shards one at a time until they do. No shard is fetched twice. ``what``
    names the segment in messages ("segment 12").

    Raises :class:`ShardsUnavailable` when fewer than k intact shards can be had, and
    :class:`ShardsUndecodable` when all of them still do not decode, or an intact one does not
    unwhiten (a wrong audit key); both carry the lies found.
    """
    data, lies = _read(
        refs,
        k,
        transport,
        what,
        audit_key,
        lambda good: segment.decode_segment(good, k, n, size, alg),
    )
    return Decoded(data, lies)


def rebuild_fragments(
    refs: Sequence[ShardRef],
    k: int,
    n: int,
    missing: Sequence[int],
    transport: Transport,
    what: str,
    *,
    alg: int,
    audit_key: bytes,
) -> Rebuilt:
    """The plain fragments with indices ``missing`` of one segment coded k-of-n with erasure
    algorithm ``alg``, rebuilt from k intact shards in ``refs`` (none of them one of
    ``missing``): repair's read. Fetches, checks, widens and raises exactly as
    :func:`read_segment`, but never decodes the segment: liberasurecode reconstructs only the
    wanted fragments, byte for byte those the encoder made (ISA-L coding is deterministic)."""
    wanted = list(missing)

    def finish(good: dict[int, bytes]) -> dict[int, bytes]:
        frags = erasure.reconstruct(list(good.values()), wanted, k, n, alg)
        return dict(zip(wanted, frags, strict=True))

    fragments, lies = _read(refs, k, transport, what, audit_key, finish)
    return Rebuilt(fragments, lies)


def _read(
    refs: Sequence[ShardRef],
    k: int,
    transport: Transport,
    what: str,
    audit_key: bytes,
    finish: Callable[[dict[int, bytes]], T],
) -> tuple[T, list[Lie]]:
    """The common loop of :func:`read_segment` and :func:`rebuild_fragments`: gather k intact
    unwhitened fragments {index: fragment}, and widen by one while ``finish`` raises
    IntegrityError on them (a singular subset)."""
    queue = sorted(refs, key=lambda r: preference(r, k))
    good: dict[int, bytes] = {}
    lies: list[Lie] = []

    def take(want: int) -> None:
        batch, queue[:want] = queue[:want], []
        got = transport.fetch(batch)
        for ref in batch:
            body = got.get(ref.name)
            if body is None or isinstance(body, str):
                lies.append(Lie(ref, "missing", body or ""))
            elif not intact(body, ref.hash, ref.size):
                lies.append(Lie(ref, "corrupt"))
            else:
                try:
                    good[ref.idx] = segment.open_fragment(body, audit_key, ref.name, ref.idx)
                except IntegrityError as e:  # the object written, but not readable with this key
                    raise ShardsUndecodable(f"{what}: {e.message}", lies) from None

    while len(good) < k and queue:
        take(k - len(good))
    if len(good) < k:
        shards = "shard" if len(good) == 1 else "shards"
        holders = {r.idx: r.holder for r in refs}
        raise ShardsUnavailable(
            f"{what}: only {len(good)} intact {shards} reachable, need {k}",
            lies,
            len(good),
            k,
            sorted({holders[i] for i in good}),
        )
    while True:
        try:
            return finish(good), lies
        except IntegrityError:
            have = len(good)
            while len(good) == have and queue:
                take(1)
            if len(good) == have:
                raise ShardsUndecodable(f"{what}: its shards do not decode", lies) from None
