"""Which module implements each kind's workload, and how a workload says it is not built."""

from __future__ import annotations

# Each module exposes `run(spec_uri: str) -> int | None`.
WORKLOAD_MODULES = {
    "corpus-filter": "tokenmill.trainer.curate.workload",
    "synthetic-data": "tokenmill.trainer.synth.workload",
    "training-stage": "tokenmill.trainer.train.workload",
    "pts": "tokenmill.trainer.pts.workload",
}

# Exit status of a workload (or a stage of one) that does not exist yet; 78 is EX_CONFIG.
NOT_BUILT_EXIT_CODE = 78
