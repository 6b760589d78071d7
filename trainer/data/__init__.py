"""The training data pipeline: packing, token-shard cache, mixture planning and sampling.

Modules, from the bottom up:

- `packing`: documents to fixed-length token sequences (pure numpy).
- `plan`: a mixture's draws per source from weights, epochs and a token budget (pure Python,
  no numpy or torch, so the validator and the local runner can call it before any compute).
- `permutation`, `schedule`: random-access per-epoch shuffles and the smooth interleaving of
  sources, both O(1) in memory.
- `sampler`: the deterministic, resumable, rank-split order of (source, sequence) draws.
- `midtrain`: the long-context stage's 30% new / 70% replay split and long-document boosts.
- `cache`: token shards in the object store, built in parallel on Ray, resumable.
- `loader`: the torch-facing micro-batch iterator with its checkpointable state.

This package imports nothing heavy at import time; import the module you need.
"""
