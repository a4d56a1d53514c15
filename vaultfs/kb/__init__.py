"""The knowledge-base layer: a belief graph in Postgres (pgvector embeddings and typed edges)
as a first-class citizen of the vault.

Modules: ``schema`` (the belief schema, edge types, where the database is), ``db``
(connections with clear errors), ``layout`` (the ``kb/`` files in a snapshot, their Merkle
tree and ``kb/manifest.json``), ``snapshot`` (graph snapshots from one consistent read),
``reader`` (``kb/`` files from a snapshot, locally or from any k remotes), ``restore`` (graph
restore with referential integrity and a quarantine), ``history`` (show / history / diff
across snapshots), ``graph`` (graph commands on the live database), ``migrate`` (any pgvector
table into the belief schema).
"""
