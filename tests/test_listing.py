"""The compact listing a restore holds (vaultfs.listing) and the rc listing it is built from."""

from __future__ import annotations

import json
import random

import pytest

from vaultfs.errors import RemoteError
from vaultfs.listing import Listed, compact
from vaultfs.remotes import RcloneRc


def _names(n: int, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    return {rng.randbytes(16).hex(): rng.randrange(-1, 1 << 40) for _ in range(n)}


def test_a_listed_folder_is_the_mapping_it_was_built_from() -> None:
    want = _names(500)
    want |= {"00000000000000000007-abcd.manifest": 900, "A" * 32: 3, "stray": -1}
    got = Listed(want.items())
    assert dict(got) == want and len(got) == len(want)
    for name, size in want.items():
        assert name in got and got[name] == size and got.get(name) == size
    absent = ["f" * 32, "a" * 31, "a" * 33, "", "g" * 32, "a" * 32]
    for name in absent:
        assert name not in got and got.get(name) is None
    with pytest.raises(KeyError):
        got["0" * 32]
    assert 5 not in got


def test_a_name_given_twice_keeps_its_last_size_and_an_empty_folder_is_empty() -> None:
    name = "ab" * 16
    assert dict(Listed([(name, 1), ("x", 2), (name, 7), ("x", 3)])) == {name: 7, "x": 3}
    assert dict(Listed([])) == {} and "x" not in Listed([])
    tree = compact({"data": _names(3), "meta": {}, "manifests": {"m": 5}})
    assert {sub: dict(v) for sub, v in tree.items()} == {
        "data": _names(3),
        "meta": {},
        "manifests": {"m": 5},
    }


class _Daemon:
    def __init__(self, answer: object) -> None:
        self.answer = answer

    def call(self, method: str, params: dict, timeout: float = 0, object_hook=None) -> object:
        return json.loads(json.dumps(self.answer), object_hook=object_hook)


def _rc(answer: object) -> RcloneRc:
    r = RcloneRc("fake:vault")
    r._daemon = lambda what: _Daemon(answer)  # type: ignore[method-assign]
    return r


def test_rc_listing_entries_are_parsed_to_name_path_and_size() -> None:
    entries = [
        {"Name": "a", "Path": "data/a", "Size": 5, "IsDir": False, "Hashes": {"md5": "x"}},
        {"Name": "b", "Path": "meta/b", "Size": "7"},  # a size that is not an int: unknown
        {"Name": "c", "Path": "manifests/c"},
    ]
    r = _rc({"list": entries})
    assert r.list_tree() == {"data": {"a": 5}, "meta": {"b": -1}, "manifests": {"c": -1}}
    assert r.list("data") == ["a", "b", "c"] and r.list_sizes("x")["a"] == 5


@pytest.mark.parametrize(
    "answer",
    [
        {"list": [{"Name": "a"}]},
        {"list": [{"Name": "a", "Path": 3}]},
        {"list": [{"Name": "a", "Path": "data/a", "list": []}]},
        {"list": [["a", "data/a", 5]]},
        {"list": {"Name": "a", "Path": "data/a"}},
        {"nolist": []},
        [],
    ],
)
def test_a_malformed_rc_listing_is_refused(answer: object) -> None:
    with pytest.raises(RemoteError, match="malformed listing"):
        _rc(answer).list_tree()
