"""The kopf operator: reconciles the four kinds into KubeRay RayJobs.

Start it with `tokenmill operator` (or `python -m tokenmill.operator`); `kopf run -m
tokenmill.operator` works too: kopf imports this package after itself, and the handlers are
then registered on kopf's default registry. Anything else importing the package (the
`tokenmill` CLI, `tokenmill render`) stays light and registers nothing.

Modules: config (cluster defaults), naming (RayJob names and labels), rayjob (the manifest),
status and conditions (views and Kubernetes-style conditions), reconcile (the pure decision),
controller (cache, work queue, actions), kube (API calls), storage (object store),
handlers (kopf), metrics (/metrics), render and cli (commands).
"""

import sys as _sys

if "kopf" in _sys.modules:  # loaded by `kopf run -m tokenmill.operator`
    from tokenmill.operator.handlers import register as _register

    _register(_sys.modules["kopf"].get_default_registry())
