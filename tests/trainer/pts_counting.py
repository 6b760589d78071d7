"""The PTSJob workload with the torch engine's answers on record, for the kill-and-resume test.

    python -m tests.trainer.pts_counting SPEC_URI LOG_PATH PROBLEMS_PER_SHARD [HOLD_SHARD HOLD_AFTER]

Runs `tokenmill.trainer.pts.workload.run(SPEC_URI)` with shards of PROBLEMS_PER_SHARD problems.
Every sample the torch engine answers is appended to LOG_PATH (a JSON line with its request-cache
key and the search, counted from 0 in this process, it belongs to) as soon as the engine returns.
With HOLD_SHARD and HOLD_AFTER, the engine call after the first HOLD_AFTER calls of search
HOLD_SHARD is never answered: the line `{"held": true}` is logged and the call blocks until the
process is killed.
"""

from __future__ import annotations

import json
import sys
import threading


def main(argv: list[str]) -> int:
    from tokenmill.trainer.generate.cache import request_keys
    from tokenmill.trainer.generate.torch_engine import TorchEngine
    from tokenmill.trainer.pts import workload

    spec_uri, log_path, per_shard = argv[0], argv[1], int(argv[2])
    hold_shard, hold_after = (int(argv[3]), int(argv[4])) if len(argv) > 3 else (-1, 0)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open until the process ends (or is killed)
    state = {"search": -1, "calls": 0}
    workload.PROBLEMS_PER_SHARD = per_shard
    real_search, real_generate = workload.search, TorchEngine.generate

    def search(*args, **kwargs):
        state["search"] += 1
        state["calls"] = 0
        return real_search(*args, **kwargs)

    def generate(engine, requests):
        if state["search"] == hold_shard and state["calls"] >= hold_after:
            log.write(json.dumps({"held": True}) + "\n")
            threading.Event().wait()
        state["calls"] += 1
        outputs = real_generate(engine, requests)
        for request, output in zip(requests, outputs, strict=True):
            keys = request_keys(engine.engine_name, engine.model_identity, request)
            for completion in output.completions:
                log.write(json.dumps({"key": keys[completion.index], "search": state["search"]}) + "\n")
        return outputs

    workload.search = search
    TorchEngine.generate = generate
    return workload.run(spec_uri)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
