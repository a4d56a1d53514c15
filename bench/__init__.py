"""vaultfs benchmarks: ``scripts/bench`` runs them (see docs/benchmarks.md).

Layout: ``harness`` (timing, peak RSS, results, table), ``dataset`` (the cached knowledge-base
dumps), ``pg`` (embedded Postgres), ``sections/<name>.py`` (one file per benchmark section, each
registering itself with :func:`bench.harness.section`).
"""
