"""A short, deterministic fuzzing budget for every parser of bytes from outside
(tests/fuzz_targets.py says which and what the property is; ``scripts/fuzz`` runs the long
budget). Each target starts from the committed seed corpus (tests/fuzz_corpus/) and runs
``EXAMPLES`` derandomised hypothesis examples: the same inputs on every run."""

from __future__ import annotations

import pytest
from fuzz_targets import TARGETS, check, corpus, mutants
from hypothesis import HealthCheck, given, settings

# a failing input is printed in full however long it is (a shard, a manifest)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

EXAMPLES = 60
CI = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_seed_corpus_is_valid_input(name: str) -> None:
    """Every seed passes the property itself (and exists: the corpus is committed)."""
    seeds = corpus(name)
    assert seeds, f"tests/fuzz_corpus/{name}/ is empty: run scripts/fuzz --make-corpus"
    for data in seeds:
        check(TARGETS[name], data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutants_raise_only_documented_errors(name: str) -> None:
    target = TARGETS[name]

    @CI
    @given(mutants(target))
    def run(data: bytes) -> None:
        check(target, data)

    run()
