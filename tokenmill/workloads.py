"""How a workload says it is not built, and how to tell whether a kind's workload is.

Each kind's descriptor (`tokenmill.api.resources.KINDS`) names its workload module, which
exposes `run(spec_uri: str) -> int | None`.
"""

from __future__ import annotations

import importlib.util

# Exit status of a workload (or a stage of one) that does not exist yet; 78 is EX_CONFIG.
NOT_BUILT_EXIT_CODE = 78

# The progress phase a workload writes last, after its outputs are committed; the local
# runner skips a resource whose progress says so for the same run spec.
PHASE_SUCCEEDED = "succeeded"


def workload_built(module: str) -> bool:
    """Whether a kind's workload module (its descriptor's `workload_module`) exists in this installation."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing too
        return False

# The workload's driver serves Prometheus metrics on this port when the variable is set; the
# operator sets it on the head pod (where a RayJob's driver runs) and names the port.
METRICS_PORT_ENV = "TOKENMILL_METRICS_PORT"
METRICS_PORT = 9464
METRICS_PORT_NAME = "tm-metrics"
