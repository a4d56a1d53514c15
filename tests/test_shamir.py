"""Shamir recovery shares (SLIP-39 via shamir-mnemonic): reference vectors and every error."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import shamir_mnemonic

from vaultfs import shamir
from vaultfs.errors import InputError, ShareError, WrongKey
from vaultfs.keys import VaultKeys, new_seed

VECTORS = json.loads((Path(__file__).parent / "data" / "slip39_vectors.json").read_text())


@pytest.mark.parametrize("desc, mnemonics, secret", VECTORS["vectors"], ids=lambda x: str(x)[:40])
def test_slip39_reference_vectors(desc: str, mnemonics: list[str], secret: str) -> None:
    """shamir-mnemonic's own vectors (Trezor, passphrase 'TREZOR'): valid ones recover the
    published secret; invalid ones are refused."""
    passphrase = VECTORS["passphrase"].encode()
    if secret:
        assert shamir_mnemonic.combine_mnemonics(mnemonics, passphrase).hex() == secret
    else:
        with pytest.raises(shamir_mnemonic.MnemonicError):
            shamir_mnemonic.combine_mnemonics(mnemonics, passphrase)


@pytest.fixture(scope="module")
def vault_keys() -> VaultKeys:
    return VaultKeys.from_seed(new_seed())


@pytest.fixture(scope="module")
def share_files(vault_keys: VaultKeys) -> list[shamir.ParsedShare]:
    mnemonics = shamir.split(vault_keys, 3, 5)
    return [
        shamir.parse_share_text(
            shamir.share_file_text(vault_keys, m, 3, 5), f"share-{i + 1}-of-5.txt"
        )
        for i, m in enumerate(mnemonics)
    ]


def test_share_file_names_the_vault(vault_keys: VaultKeys, share_files) -> None:
    for p in share_files:
        assert p.fingerprint == vault_keys.fingerprint()
        assert p.vault_id == vault_keys.vault_id.hex()
        assert len(p.mnemonic.split()) == 33  # 256-bit seed
        assert vault_keys.seed.hex() not in p.mnemonic


def test_every_3_of_5_subset_recovers_the_same_seed(vault_keys: VaultKeys, share_files) -> None:
    subsets = list(itertools.combinations(share_files, 3))
    assert len(subsets) == 10
    for subset in subsets:
        keys = shamir.recover(list(subset), vault_keys.fingerprint(), vault_keys.vault_id)
        assert keys.seed == vault_keys.seed
    # all five work too, and bare typed words (no file header) recover as well
    typed = [shamir.ParsedShare(f"typed {i}", p.mnemonic) for i, p in enumerate(share_files)]
    assert shamir.recover(typed[1:4]).seed == vault_keys.seed
    assert shamir.recover(share_files).seed == vault_keys.seed


def test_two_shares_are_too_few(share_files) -> None:
    with pytest.raises(ShareError, match="2 share\\(s\\) given, but this share set needs 3"):
        shamir.recover(share_files[:2])


def test_a_mistyped_word_is_named_with_its_position(share_files) -> None:
    good = share_files[1].mnemonic.split()
    # a word that is not in the SLIP-39 list
    typo = list(good)
    typo[11] = typo[11][:-1] + ("x" if typo[11][-1] != "x" else "y")
    with pytest.raises(ShareError, match=f"word 12 '{typo[11]}' is not a SLIP-39 share word"):
        shamir.recover(
            [share_files[0], shamir.ParsedShare("typed", " ".join(typo)), share_files[2]]
        )
    # a real word in the wrong place: the checksum locates it and offers the right one
    swapped = list(good)
    swapped[20] = "academic" if good[20] != "academic" else "acid"
    with pytest.raises(
        ShareError, match=f"word 21 '{swapped[20]}' is wrong .*checks out with '{good[20]}'"
    ):
        shamir.recover(
            [share_files[0], shamir.ParsedShare("typed", " ".join(swapped)), share_files[2]]
        )
    # a missing word cannot be located: the message says so
    with pytest.raises(ShareError, match="checksum fails \\(32 words\\)"):
        shamir.recover([shamir.ParsedShare("short", " ".join(good[:-1]))])


def test_shares_of_two_different_splits_are_refused(vault_keys: VaultKeys, share_files) -> None:
    other_split = shamir.split(vault_keys, 3, 5)
    mixed = share_files[:2] + [shamir.ParsedShare("from the second split", other_split[2])]
    with pytest.raises(ShareError, match="come from 2 different splits"):
        shamir.recover(mixed)
    with pytest.raises(ShareError, match="same share as"):
        shamir.recover([share_files[0], share_files[0], share_files[1]])


def test_a_share_of_another_vault_is_refused(vault_keys: VaultKeys, share_files) -> None:
    other = VaultKeys.from_seed(new_seed())
    foreign = shamir.split(other, 3, 5)
    foreign_file = shamir.parse_share_text(
        shamir.share_file_text(other, foreign[0], 3, 5), "their-share.txt"
    )
    with pytest.raises(WrongKey, match="belong to different vaults"):
        shamir.recover(share_files[:2] + [foreign_file])
    # typed words carry no fingerprint: the recovered seed is checked against this vault's
    typed = [shamir.ParsedShare(f"typed {i}", m) for i, m in enumerate(foreign[:3])]
    with pytest.raises(WrongKey, match="belong to another vault"):
        shamir.recover(typed, vault_keys.fingerprint())
    with pytest.raises(WrongKey, match="belong to another vault"):
        shamir.recover(typed, None, vault_keys.vault_id)
    foreign_files = [
        shamir.parse_share_text(shamir.share_file_text(other, m, 3, 5), f"f{i}")
        for i, m in enumerate(foreign[:3])
    ]
    with pytest.raises(WrongKey, match=f"not to this vault {vault_keys.fingerprint()}"):
        shamir.recover(foreign_files, vault_keys.fingerprint())


def test_split_refuses_bad_parameters(vault_keys: VaultKeys) -> None:
    for t, n in ((4, 3), (0, 3), (3, 17), (1, 3)):
        with pytest.raises(InputError):
            shamir.split(vault_keys, t, n)
