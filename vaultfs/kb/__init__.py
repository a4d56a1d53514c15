"""The knowledge-base layer: a belief graph in Postgres (pgvector embeddings and typed edges)
as a first-class citizen of the vault.

Modules: ``schema`` (the belief schema, edge types, where the database is), ``snapshot``
(graph snapshots into the vault's ``kb/`` layout), ``restore`` (graph restore with referential
integrity), ``history`` (show / history / diff across snapshots), ``graph`` (graph commands on
the live database), ``migrate`` (any pgvector table into the belief schema).
"""
