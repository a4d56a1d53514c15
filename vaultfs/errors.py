"""Errors a user can cause or meet, each with a sentence that says what to do and an exit code.

The exit codes are part of the command-line contract (see docs/operations.md):

====  ==========================================================================
code  meaning
====  ==========================================================================
0     success
1     unexpected internal error (a bug: please report it)
2     usage error the argument parser finds (an unknown flag, a value of the wrong type, a
      missing required argument), an invalid strategy file, or a retention policy that
      would forget every snapshot
3     committed locally, but some data is not yet on at least k remotes
10    wrong passphrase, wrong key or key material from another vault
11    not enough healthy remotes (fewer than k reachable or intact)
12    integrity failure: tampered, corrupt or rolled-back data was detected
13    restore target exists and is not empty
14    a remote spec was rejected (by us or by rclone)
15    local disk full
16    no vault here (not initialised) or a vault already exists
17    the vault is busy (locked by another vaultfs process)
18    input not found or not readable, a local path that cannot be used as asked, or
      arguments the command finds do not go together (contradictory flags, neither of two
      required alternatives: `backup` without PATH or --stdin)
19    a recovery share is mistyped, missing, or from another share set
20    `vaultfs run`: a scheduled job or a tier failed, or an audit found damage (alerted)
21    stale base: the remotes hold manifests this home never wrote (rebuild or --fork)
22    `vaultfs drill`: a disaster drill failed (its row says why)
23    the vault is immutable (or a remote locks its objects): the command would delete
24    thaw needed: objects on an archive storage class (Glacier) must be restored first
25    the mount daemon stopped mid-request (closed the control connection unanswered)
141   standard output was closed under the command (a broken pipe: `vaultfs ls | head`):
      it stopped quietly, as a program SIGPIPE ends (128 + SIGPIPE, what the shell shows)
====  ==========================================================================
"""

from __future__ import annotations


class VaultError(Exception):
    """Base class: an error that is explained to the user, never a traceback."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WrongKey(VaultError):
    exit_code = 10


class NotEnoughRemotes(VaultError):
    exit_code = 11


class RemoteError(VaultError):
    """A remote failed an operation (any failure not classified more precisely below)."""

    exit_code = 11


class Unreachable(RemoteError):
    """A remote is temporarily unreachable: connection refused or reset, a timeout, or
    throttling (HTTP 429/503). The data on it is presumed intact; try again later.
    ``throttled``: the provider said it throttles us (back off as a whole, not only the call).
    ``silent``: it sent nothing for :data:`vaultfs.remotes.SILENT_AFTER` seconds (no answer
    to a request, or a transfer that stalled): not asked again for a while, never retried
    at once (:class:`vaultfs.backends.Pace`)."""

    exit_code = 11

    def __init__(self, message: str, throttled: bool = False, silent: bool = False) -> None:
        super().__init__(message)
        self.throttled = throttled
        self.silent = silent


class RootMissing(Unreachable):
    """A local-directory remote's root directory does not exist: a disk unplugged, a path
    moved or deleted. The remote is down, not empty: nothing is read from it or written to
    it (a write would recreate the directory, on the wrong disk), and no retry can help
    until the directory is back (:class:`vaultfs.backends.LocalRoot`)."""


class ObjectMissing(RemoteError):
    """The remote answered, and the object is not there: that remote is not intact for it
    (``vaultfs repair`` rebuilds it from the other remotes)."""

    exit_code = 11


class ThawNeeded(RemoteError):
    """The remote keeps the object in an archive storage class (S3 Glacier, Deep Archive):
    it cannot be read until a restore request ("thaw") completes. Request one for the
    vault's prefix (``rclone backend restore REMOTE -o priority=Standard``), wait, rerun."""

    exit_code = 24


class IntegrityError(VaultError):
    exit_code = 12


class Rollback(IntegrityError):
    """The remotes' newest manifest is older than a floor the user or this machine knows
    (``--min-seq``, ``--receipt``, the local index): remotes hide newer manifests."""

    exit_code = 12


class StaleBase(VaultError):
    """The remotes hold a validly signed manifest this home's chain never wrote, newer than
    its base: committing would fork the vault. Rebuild the home from the remotes, or record
    an explicit fork (``--fork``)."""

    exit_code = 21


class TargetNotEmpty(VaultError):
    exit_code = 13


class BadRemote(VaultError):
    """A remote spec was rejected, by vaultfs or by rclone: fix the spec."""

    exit_code = 14


class DiskFull(VaultError):
    exit_code = 15


#: SQLite's result code for "database or disk is full" (sqlite3.SQLITE_FULL)
_SQLITE_FULL = 13


def disk_full(e: BaseException) -> DiskFull | None:
    """``e`` as a :class:`DiskFull` when it says the local disk is full: an OSError ENOSPC or
    EDQUOT, or SQLite's SQLITE_FULL ("database or disk is full", raised by the index's
    commits); else None. The one place both spellings are recognised (cli/main.py for every
    command, vaultfs/control.py for the mount daemon's requests)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full: {e}; free space and retry")
    if (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF == _SQLITE_FULL:
        return DiskFull(
            f"local disk full: the index could not be written ({e}); nothing acknowledged "
            "was lost: free space and retry"
        )
    return None


class NoVault(VaultError):
    exit_code = 16


class RemoteHoldsVault(NoVault):
    """A new vault was asked for over a location that already holds one (its ``manifests/``
    is not empty): give an empty location, or rebuild the lost home of that vault from it
    (``spec``: the location)."""

    def __init__(self, message: str, spec: str) -> None:
        super().__init__(message)
        self.spec = spec


class VaultBusy(VaultError):
    exit_code = 17


class ConfigError(VaultError):
    """The strategy file is not valid YAML or not a valid strategy: the message names the
    file, the line and the key to fix (vaultfs/strategy.py)."""

    exit_code = 2


class InputError(VaultError):
    exit_code = 18


class ShareError(VaultError):
    """A Shamir recovery share has a mistyped word, too few shares, or mixes share sets."""

    exit_code = 19


class PolicyKeepsNothing(VaultError):
    """A forget policy (`vaultfs forget`, the schedule's ``retention``) would forget every
    snapshot of the vault: refused before anything is forgotten, as restic 0.17 and later
    refuse a policy that would empty a snapshot group. Usually a ``--keep-name`` glob with a
    typo: fix the policy (``--dry-run`` shows what it keeps once it keeps something)."""

    exit_code = 2


class ImmutableVault(VaultError):
    """The vault was made ``--immutable`` (append-only): the command would ask its remotes to
    delete objects, which such a vault never does. Space on its remotes is freed by retiring
    the vault whole, with separate credentials (docs/operations.md, "Immutable vaults").
    Also `fork retire` on a remote whose spec asks for S3 Object Lock: its objects cannot be
    deleted while locked."""

    exit_code = 23


EXIT_PARTIAL = 3
EXIT_JOB_FAILED = 20
EXIT_DRILL_FAILED = 22
#: the mount daemon closed the control connection without an answer (vaultfs/control.py)
EXIT_DAEMON_GONE = 25
#: standard output closed under the command (a broken pipe: `vaultfs ls | head`): a quiet
#: end, 128 + SIGPIPE, what the shell reports for a program that SIGPIPE ended (cli/main.py)
EXIT_STDOUT_CLOSED = 141
