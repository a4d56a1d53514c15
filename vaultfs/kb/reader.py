"""Reading ``kb/`` files out of the vault's snapshots without restoring anything else.

:func:`open_kb_files` works from the local vault (its index and queue, remotes for the rest)
or, with remote specs, from any k remotes and the key alone, like ``vaultfs restore --from``.
Either way a read goes through :func:`vaultfs.restore.restore_files` with ``include``, so only
the segments holding the chunks of the named files are fetched and checked (AEAD tags, chunk
ids, shard hashes). :attr:`KbFiles.bytes_read` counts the shard objects read from remotes.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import names
from ..backends import open_backend
from ..errors import InputError, IntegrityError
from ..index import Index
from ..index import kb as kbroots
from ..index import snapshots as snapshot_table
from ..keys import VaultKeys
from ..restore import Fetched, ShardSource, open_remote_index, restore_files, too_few_remotes
from ..scratch import owned_scratch
from ..shardreader import ShardRef
from ..vault import Vault
from . import layout
from .layout import KbManifest


class CountingSource(ShardSource):
    """A ShardSource that adds up the size of every shard object it fetched from a remote
    (the local queue is not counted)."""

    bytes_read = 0
    objects_read = 0

    def fetch(self, wanted: list[tuple[str, ShardRef]], into: Path) -> dict[str, Fetched]:
        got = super().fetch(wanted, into)
        for name, f in got.items():
            if name not in self.local:
                self.bytes_read += f.path.stat().st_size
                self.objects_read += 1
        return got


@dataclass(frozen=True)
class KbSnap:
    """A vault snapshot that holds a knowledge base (``kb/manifest.json``)."""

    id: int
    uid: str
    name: str | None
    created: float
    seq: int

    @property
    def label(self) -> str:
        return f"{self.uid} ({self.name})" if self.name else self.uid


class KbFiles:
    """The knowledge-base snapshots of one vault index, and their files on demand.

    ``signed``: {snapshot uid: kb summary} as the manifest signs them (docs/format.md 10.2):
    from the newest signed manifest when read from remotes alone, else from the local index,
    whose rows every manifest since the snapshot carries."""

    def __init__(
        self,
        keys: VaultKeys,
        index: Index,
        src: CountingSource,
        work: Path,
        warnings: list[str],
        signed: dict[str, dict],
    ) -> None:
        self.keys, self.index, self.src, self.work = keys, index, src, work
        self.warnings = warnings
        self.signed = signed
        self._manifests: dict[int, KbManifest] = {}
        self._reads = 0
        self._seen: dict[str, bytes] = {}  # blake3 -> content, for files read once
        #: what :meth:`find` says of a name several knowledge-base snapshots share (the
        #: newest is taken), for the command to print like `vaultfs ls` does
        self.notes: list[str] = []

    @property
    def bytes_read(self) -> int:
        return self.src.bytes_read

    def snapshots(self) -> list[KbSnap]:
        """Every snapshot holding ``kb/manifest.json``, oldest first."""
        return [
            KbSnap(*r) for r in snapshot_table.holding(self.index, names.to_db(layout.MANIFEST))
        ]

    def find(self, snapshot: str) -> KbSnap:
        """A knowledge-base snapshot by uid, name or ``latest`` (the newest one holding a
        knowledge base); InputError if there is none such. A name several of them share
        means the newest, and a note naming it and the others goes to :attr:`notes`."""
        snaps = self.snapshots()
        if not snaps:
            raise InputError(
                "the vault holds no knowledge-base snapshot (run `vaultfs kb snapshot`)"
            )
        if snapshot == "latest":
            return snaps[-1]
        hits = [s for s in snaps if snapshot in (s.uid, s.name)]
        if hits:
            if note := snapshot_table.newest_note(snapshot, [s.uid for s in reversed(hits)]):
                if note not in self.notes:
                    self.notes.append(note)
            return hits[-1]
        if snapshot_table.find(self.index, snapshot) is not None:
            raise InputError(f"snapshot {snapshot!r} holds no knowledge base (no kb/manifest.json)")
        raise InputError(f"snapshot {snapshot!r} not found (see `vaultfs snapshots`)")

    def places(self, snap: KbSnap) -> dict[str, tuple[int, int]]:
        """{path: (size, lowest segment id holding a chunk of it, -1 if none)} of every file
        of ``snap``, from the index alone: lets a reader group files that share segments."""
        return {
            names.fs_path(p): (size, seg)
            for p, size, seg in kbroots.file_places(self.index, snap.id)
        }

    def read(self, snap: KbSnap, paths: list[str], cache: bool = False) -> dict[str, bytes]:
        """The files ``paths`` of ``snap`` (each checked against kb/manifest.json, except the
        manifest itself). Paths the manifest does not list (an empty bucket) are left out.
        With ``cache`` the files are kept, and a file already kept from any snapshot (same
        BLAKE3 in the manifest) is not fetched again (history and diff read few files from
        many snapshots; a restore reads many once and keeps none)."""
        if paths == [layout.MANIFEST]:
            return {layout.MANIFEST: self._fetch(snap, paths)[layout.MANIFEST]}
        m = self.manifest(snap)
        out: dict[str, bytes] = {}
        want = []
        for p in dict.fromkeys(paths):
            if p not in m.files:
                continue
            hit = self._seen.get(m.files[p].blake3)
            if hit is not None:
                out[p] = hit
            else:
                want.append(p)
        for p, data in self._fetch(snap, want, _includes(m, want)).items():
            layout.check_file(m, p, data)
            out[p] = data
            if cache:
                self._seen[m.files[p].blake3] = data
        return out

    def read_dirs(self, snap: KbSnap, dirs: list[str]) -> dict[str, bytes]:
        """Every file under ``dirs`` (directories or single files of the layout), read in
        one pass together with kb/manifest.json, which is then checked and kept: the files
        must be exactly those the manifest lists there, each with its size and BLAKE3. Saves
        a whole restore the separate pass for the manifest."""
        got = self._fetch(snap, [layout.MANIFEST], [layout.MANIFEST, *dirs], walk=True)
        m = KbManifest.parse(got.pop(layout.MANIFEST))
        self._manifests[snap.id] = m
        listed = {p for p in m.files if any(p == d or p.startswith(d + "/") for d in dirs)}
        if set(got) != listed:
            raise IntegrityError("the snapshot's kb/ files do not match kb/manifest.json")
        for p, data in got.items():
            layout.check_file(m, p, data)
        return got

    def read_present(self, snap: KbSnap, paths: list[str]) -> dict[str, bytes]:
        """The files among ``paths`` that ``snap`` holds, read without kb/manifest.json: for
        a single lookup, where the manifest's hashes would cost a segment of their own and
        add nothing (the vault's AEAD tag and keyed id of every chunk authenticate it)."""
        stored = snapshot_table.present(self.index, snap.id, [names.to_db(p) for p in paths])
        held = {names.fs_path(p) for p in stored}
        return self._fetch(snap, [p for p in paths if p in held])

    def _fetch(
        self,
        snap: KbSnap,
        paths: list[str],
        include: list[str] | None = None,
        walk: bool = False,
    ) -> dict[str, bytes]:
        """``paths`` restored (with ``include``: those includes) into a scratch directory
        and read back; ``walk``: every file restored, not only ``paths``."""
        if not paths:
            return {}
        self._reads += 1
        to = self.work / f"read{self._reads}"
        try:
            with too_few_remotes(self.src, f"read the knowledge base of snapshot {snap.label}"):
                restore_files(self.keys, self.index, self.src, to, snap.uid, include or paths)
            if walk:
                paths = [str(f.relative_to(to)) for f in sorted(to.rglob("*")) if f.is_file()]
            return {p: (to / p).read_bytes() for p in paths}
        finally:
            shutil.rmtree(to, ignore_errors=True)

    def check_signed(self, snap: KbSnap, m: KbManifest) -> None:
        """IntegrityError unless ``m`` (the snapshot's kb/manifest.json) has the root, row
        counts and checksums the vault's manifest signs for the snapshot."""
        signed = self.signed.get(snap.uid)
        if signed is None:
            raise IntegrityError(
                f"snapshot {snap.label}: its kb root is not in the signed manifest"
            )
        if signed != m.summary():
            raise IntegrityError(
                f"snapshot {snap.label}: kb/manifest.json does not match the kb root, row "
                "counts and checksums the vault's manifest signs"
            )

    def manifest(self, snap: KbSnap) -> KbManifest:
        m = self._manifests.get(snap.id)
        if m is None:
            m = KbManifest.parse(self.read(snap, [layout.MANIFEST])[layout.MANIFEST])
            self._manifests[snap.id] = m
        return m


def _includes(m: KbManifest, paths: list[str]) -> list[str]:
    """``paths`` as restore_files includes: a directory whose every file is wanted is named
    once (its matching costs one comparison per entry instead of one per file)."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(p.rpartition("/")[0], []).append(p)
    out = []
    for d, ps in by_dir.items():
        listed = sum(1 for f in m.files if f.rpartition("/")[0] == d)
        out += [d] if len(ps) == listed and d != layout.ROOT else ps
    return out


@contextlib.contextmanager
def open_kb_files(
    keys: VaultKeys, home: Path, remote_specs: list[str] | None = None
) -> Iterator[KbFiles]:
    """The knowledge-base files of a vault: from the local vault at ``home``, or, with
    ``remote_specs``, from those remotes alone (any k of them; nothing local is read)."""
    with owned_scratch("vaultfs-kb-") as tmp:
        work = Path(tmp)
        if remote_specs:
            src = CountingSource([open_backend(s) for s in remote_specs])
            src.start()
            try:
                with too_few_remotes(src, "read the knowledge base", " (or give more --from)"):
                    index, _src, m, warnings = open_remote_index(
                        keys, src.remotes, work, 0, src=src
                    )
                try:
                    yield KbFiles(keys, index, src, work, warnings, m.contents.kb)
                finally:
                    index.close()
            finally:
                src.stop()
        else:
            v = Vault.open(home, keys=keys, lock=False)
            try:
                src = CountingSource(v.remotes(), v.queue_dir)
                src.list_all()
                yield KbFiles(keys, v.index, src, work, [], kbroots.summaries(v.index))
            finally:
                v.close()
