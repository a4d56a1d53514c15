"""Shamir recovery of the master seed: SLIP-39 mnemonic shares (Trezor's `shamir-mnemonic`).

``split`` cuts the 32-byte master seed into ``count`` shares of 33 words, any ``threshold`` of
which recover it (one SLIP-39 group, no SLIP-39 passphrase, extendable flag set, iteration
exponent 1). Every split draws a fresh random 15-bit SLIP-39 identifier, so shares of two
splits never combine.

A share file (``share-2-of-5.txt``) carries, besides the words, the vault's public fingerprint
and vault id, so a holder can tell which vault a share belongs to and ``recover`` can refuse a
share of another vault before combining anything.

``recover`` checks, in this order, and raises the first problem with a sentence that says which
share and what to do: a word that is not a SLIP-39 word (position and closest words), a failed
checksum (the one word that repairs it, found by the RS1024 code's linearity, when exactly one
is wrong), shares naming different vaults, shares of different splits, the same share twice,
too few shares; then it combines and compares the recovered seed's fingerprint with the one the
shares (or the caller) expect. Nothing is written here: the caller writes the keyfile only
after this returned.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import shamir_mnemonic
from shamir_mnemonic import rs1024
from shamir_mnemonic.share import Share
from shamir_mnemonic.wordlist import WORD_INDEX_MAP, WORDLIST

from .errors import InputError, ShareError, WrongKey
from .keys import SEED_LEN, VaultKeys

ITERATION_EXPONENT = 1
MAX_SHARES = 16  # SLIP-39 encodes member counts in 4 bits


@dataclass
class ParsedShare:
    """One share as given by the user: its words, and what its file says about the vault."""

    label: str  # where it came from, for messages ("share-2-of-5.txt", "share 3 typed")
    mnemonic: str
    fingerprint: str | None = None
    vault_id: str | None = None


def split(keys: VaultKeys, threshold: int, count: int) -> list[str]:
    """Split the master seed into ``count`` SLIP-39 mnemonics, any ``threshold`` recover it."""
    if not 1 <= threshold <= count <= MAX_SHARES:
        raise InputError(
            f"need 1 <= threshold <= shares <= {MAX_SHARES}; got {threshold} of {count}"
        )
    if threshold == 1 and count > 1:
        raise InputError("a threshold of 1 makes every share a full copy of the seed: use >= 2")
    groups = shamir_mnemonic.generate_mnemonics(
        1, [(threshold, count)], keys.seed, b"", True, ITERATION_EXPONENT
    )
    return groups[0]


def share_file_text(keys: VaultKeys, mnemonic: str, threshold: int, count: int) -> str:
    """The text of one share file: who it belongs to, the words in one line and numbered."""
    share = Share.from_mnemonic(mnemonic)
    words = mnemonic.split()
    grid = []
    for row in range(0, len(words), 4):
        grid.append(
            "  ".join(f"{i + 1:>2}. {w:<10}" for i, w in enumerate(words) if row <= i < row + 4)
        )
    return (
        f"vaultfs recovery share {share.index + 1} of {count}: any {threshold} of the {count} "
        "shares recover the vault's master seed\n"
        f"vault fingerprint: {keys.fingerprint()}\n"
        f"vault id: {keys.vault_id.hex()}\n"
        f"share set: {share.identifier}\n"
        f"mnemonic: {mnemonic}\n"
        "\n" + "\n".join(grid) + "\n\n"
        "Keep this share apart from the others. Recover with `vaultfs keys recover`.\n"
    )


def parse_share_text(text: str, label: str) -> ParsedShare:
    """Read a share file (or typed words). Without a 'mnemonic:' line every word counts."""
    fingerprint = vault_id = None
    mnemonic = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "vault fingerprint":
            fingerprint = value.strip()
        elif key == "vault id":
            vault_id = value.strip().lower()
        elif key == "mnemonic":
            mnemonic = value.strip()
    if mnemonic is None:
        mnemonic = " ".join(re.findall(r"[A-Za-z]+", text))
    mnemonic = " ".join(w.lower() for w in mnemonic.split())
    if not mnemonic:
        raise ShareError(f"{label}: no share words found")
    return ParsedShare(label, mnemonic, fingerprint, vault_id)


# -- checking one share ------------------------------------------------------------------------
def _customization(extendable: bool) -> bytes:
    return b"shamir_extendable" if extendable else b"shamir"


def _basis(length: int, custom_len: int, pos: int) -> list[int]:
    """RS1024 residue change caused by flipping bit j of word ``pos`` (j = 0..9).

    The polymod is linear over GF(2) in its inputs, so a word change d = old ^ new at position
    pos changes the residue by the XOR of these basis responses for the set bits of d.
    """
    out = []
    for j in range(10):
        values = [0] * (custom_len + length)
        values[custom_len + pos] = 1 << j
        out.append(rs1024._polymod(values) ^ _zero_residue(custom_len + length))
    return out


_ZERO_CACHE: dict[int, int] = {}


def _zero_residue(n: int) -> int:
    r = _ZERO_CACHE.get(n)
    if r is None:
        r = _ZERO_CACHE[n] = rs1024._polymod([0] * n)
    return r


def _repair_candidates(indices: list[int]) -> list[tuple[int, str]]:
    """Every (position, word) single substitution that makes the checksum valid."""
    found = []
    for extendable in (True, False):
        custom = list(_customization(extendable))
        residue = rs1024._polymod(custom + indices)
        for pos, old in enumerate(indices):
            basis = _basis(len(indices), len(custom), pos)
            for new in range(len(WORDLIST)):
                d = old ^ new
                if not d:
                    continue
                delta = 0
                for j in range(10):
                    if d >> j & 1:
                        delta ^= basis[j]
                if residue ^ delta == 1:
                    found.append((pos, WORDLIST[new]))
    return sorted(set(found))


def check_share(p: ParsedShare) -> Share:
    """Decode one share or raise ShareError naming the bad word and its position."""
    words = p.mnemonic.split()
    for pos, word in enumerate(words):
        if word not in WORD_INDEX_MAP:
            close = difflib.get_close_matches(word, WORDLIST, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ShareError(
                f"{p.label}: word {pos + 1} {word!r} is not a SLIP-39 share word{hint}"
            )
    indices = [WORD_INDEX_MAP[w] for w in words]
    ok = (
        any(rs1024.verify_checksum(indices, _customization(ext)) for ext in (True, False))
        and len(words) >= 20
    )
    if not ok:
        fixes = _repair_candidates(indices) if len(words) >= 20 else []
        if len(fixes) == 1:
            pos, word = fixes[0]
            raise ShareError(
                f"{p.label}: word {pos + 1} {words[pos]!r} is wrong (checksum fails); "
                f"the share checks out with {word!r} there: compare with the paper copy"
            )
        raise ShareError(
            f"{p.label}: the share's checksum fails ({len(words)} words): a word is missing, "
            "extra, out of order or more than one is mistyped; compare with the paper copy"
        )
    try:
        return Share.from_mnemonic(p.mnemonic)
    except shamir_mnemonic.MnemonicError as e:
        raise ShareError(f"{p.label}: {e}") from None


# -- recovering the seed -----------------------------------------------------------------------
def recover(
    shares: list[ParsedShare],
    expected_fingerprint: str | None = None,
    expected_vault_id: bytes | None = None,
) -> VaultKeys:
    """Combine shares into the vault keys; every failure is a ShareError or WrongKey.

    ``expected_fingerprint`` / ``expected_vault_id`` come from local state or the user; the
    fingerprints printed in share files are checked against each other and against them.
    """
    if not shares:
        raise ShareError("no shares given: pass --share-file FILE (repeat) or type them")
    decoded = [(p, check_share(p)) for p in shares]

    named = {p.fingerprint for p in shares if p.fingerprint}
    if len(named) > 1:
        by = "; ".join(f"{p.label}: {p.fingerprint}" for p in shares if p.fingerprint)
        raise WrongKey(f"the shares belong to different vaults ({by}): use shares of one vault")
    if expected_fingerprint and named and named != {expected_fingerprint}:
        other = next(p for p in shares if p.fingerprint and p.fingerprint != expected_fingerprint)
        raise WrongKey(
            f"{other.label} belongs to vault {other.fingerprint}, not to this vault "
            f"{expected_fingerprint}"
        )

    sets = {s.identifier for _p, s in decoded}
    if len(sets) > 1:
        listing = ", ".join(f"{p.label}: set {s.identifier}" for p, s in decoded)
        raise ShareError(
            f"the shares come from {len(sets)} different splits ({listing}): every share "
            "must come from the same `vaultfs keys split`"
        )
    seen: dict[int, str] = {}
    for p, s in decoded:
        if s.index in seen:
            raise ShareError(
                f"{p.label} is the same share as {seen[s.index]} (share {s.index + 1})"
            )
        seen[s.index] = p.label
    need = decoded[0][1].member_threshold
    if len(decoded) < need:
        raise ShareError(
            f"{len(decoded)} share(s) given, but this share set needs {need}: "
            "collect more share holders"
        )
    words = [p.mnemonic for p in shares]
    try:  # SLIP-39 combines exactly `need` shares; extra shares must agree with the first ones
        seed = shamir_mnemonic.combine_mnemonics(words[:need], b"")
        if len(words) > need and shamir_mnemonic.combine_mnemonics(words[-need:], b"") != seed:
            raise ShareError("the shares disagree: one of them was altered; try other subsets")
    except shamir_mnemonic.MnemonicError as e:
        raise ShareError(f"the shares do not combine: {e}") from None
    if len(seed) != SEED_LEN:
        raise WrongKey(
            f"the shares hold a {len(seed)}-byte secret, not a vaultfs master seed (32 bytes)"
        )
    keys = VaultKeys.from_seed(seed)
    want = expected_fingerprint or (named.pop() if named else None)
    if want and keys.fingerprint() != want:
        raise WrongKey(
            f"the shares recover vault {keys.fingerprint()}, not vault {want}: "
            "they belong to another vault"
        )
    if expected_vault_id is not None and keys.vault_id != expected_vault_id:
        raise WrongKey(
            f"the shares recover vault id {keys.vault_id.hex()}, but this vault's id is "
            f"{expected_vault_id.hex()}: they belong to another vault"
        )
    for p in shares:
        if p.vault_id and p.vault_id != keys.vault_id.hex():
            raise WrongKey(f"{p.label} names vault id {p.vault_id}, not {keys.vault_id.hex()}")
    return keys
