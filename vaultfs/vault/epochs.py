"""Key epochs: which data key each epoch's records are sealed with, and which epoch new
writes use (driven by vaultfs/rotation.py through :meth:`Vault.begin_epoch`)."""

from __future__ import annotations

import threading
import time

from ..index import Index, keyring
from ..keys import SLHDSA_128S, SUITE_XWING_AES256GCM, VaultKeys


class KeyEpochs:
    """The vault's key epochs as loaded from the index into ``keys``.

    ``epoch`` and ``suite``: what new writes use; ``epoch_suites``: the suite of every
    epoch. ``write_lock`` is the vault's (reloading must not interleave with a write)."""

    def __init__(self, keys: VaultKeys, index: Index, write_lock: threading.RLock) -> None:
        self.keys = keys
        self.index = index
        self.write_lock = write_lock
        self._load_data_keys()

    def _load_data_keys(self) -> None:
        """Load key material from the index: SLH-DSA key, retired suites, epoch data keys.

        Epochs under a retired suite get no data key, so nothing under them can be read.
        """
        stored = keyring.slhdsa(self.index)
        if stored is not None:
            pub, sealed, param = stored
            # older vaults recorded no parameter set: theirs is 128s
            self.keys.load_slhdsa(bytes.fromhex(pub), bytes.fromhex(sealed), param or SLHDSA_128S)
        self.keys.retired_suites |= keyring.retired_suites(self.index)
        self.epoch_suites: dict[int, int] = {}
        for epoch, suite, wrapped in keyring.epochs(self.index):
            self.epoch_suites[epoch] = suite
            if suite not in self.keys.retired_suites:
                self.keys.data_keys[epoch] = self.keys.unwrap_data_key(epoch, wrapped, suite)
        self.epoch, self.suite = keyring.current(self.index, SUITE_XWING_AES256GCM)

    def reload(self) -> None:
        """Re-read key epochs and suites after a rotation or re-encryption step."""
        with self.write_lock:
            self.keys.data_keys.clear()
            self._load_data_keys()

    def current(self) -> tuple[int, bytes, int]:
        """(epoch, data key, suite) new records are sealed with."""
        return self.epoch, self.keys.data_keys[self.epoch], self.epoch_suites[self.epoch]

    def begin(self, suite: int) -> int:
        """Make a new key epoch (a fresh random data key wrapped to ``suite``) the one new
        writes use; returns its number. The caller has sealed what was open under the old
        one (:meth:`Vault.begin_epoch`)."""
        data_key = self.keys.new_epoch_key()
        with self.index.tx() as db:
            epoch = keyring.next_epoch(db)
            wrapped = self.keys.wrap_data_key(epoch, data_key, suite)
            now = time.time()
            keyring.add_epoch(db, epoch, suite, wrapped, now)
            keyring.set_current(db, epoch, suite)
            keyring.add_active_suite(db, suite, now)
        self.reload()
        return epoch
