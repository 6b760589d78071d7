"""The candidate's side of the code oracle's sandbox: runs the solution and answers calls.

Started by the judge (`sandbox_runner.py`) as `python -I sandbox_candidate.py LIMITS_JSON` in
the candidate's own directory holding `solution.py`, with one socket (its fd in the limits)
and nothing else open. It applies the limits, drops to the unprivileged uid it is given,
runs the solution, sends the solution's top-level names, then answers the judge's requests:
call an object, read an attribute. Plain data (None, booleans, numbers, strings, bytes, and
lists, tuples, sets and dicts of them) travels by value; anything else stays here and travels
as a reference the judge can only call or read attributes of. The tests, their assertions
and the verdict live in the judge's process, which this one cannot write to.
"""

import json
import os
import resource
import signal
import socket
import sys
import types

MAX_DEPTH = 64


class _Objects:
    def __init__(self) -> None:
        self.by_ref: dict[int, object] = {}

    def encode(self, value: object, depth: int = 0) -> object:
        if depth > MAX_DEPTH:
            raise ValueError("the value is nested too deeply")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": bytes(value).hex()}
        if isinstance(value, list):
            return [self.encode(item, depth + 1) for item in value]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(item, depth + 1) for item in value]}
        if isinstance(value, (set, frozenset)):
            return {"$set": [self.encode(item, depth + 1) for item in value]}
        if isinstance(value, dict):
            return {"$dict": [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()]}
        ref = len(self.by_ref)
        self.by_ref[ref] = value
        return {"$ref": ref}

    def decode(self, value: object) -> object:
        if isinstance(value, list):
            return [self.decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if "$ref" in value:
            return self.by_ref[value["$ref"]]
        if "$bytes" in value:
            return bytes.fromhex(value["$bytes"])
        if "$tuple" in value:
            return tuple(self.decode(item) for item in value["$tuple"])
        if "$set" in value:
            return {self.decode(item) for item in value["$set"]}
        return {self.decode(k): self.decode(v) for k, v in value["$dict"]}


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _answer(objects: _Objects, request: dict) -> dict:
    try:
        target = objects.by_ref[request["target"]]
        if request["op"] == "call":
            value = target(*objects.decode(request["args"]), **objects.decode(request["kwargs"]))
        elif request["op"] == "getattr":
            value = getattr(target, request["name"])
        else:
            raise ValueError(f"unknown request {request['op']!r}")
        return {"value": objects.encode(value)}
    except BaseException as error:  # noqa: BLE001 - the candidate's failure is the judge's to weigh
        return {"raised": type(error).__name__, "message": str(error)[:1000],
                "memory": isinstance(error, MemoryError)}


def main() -> int:
    limits = json.loads(sys.argv[1])
    channel = socket.socket(fileno=int(limits["socket_fd"]))
    stream = channel.makefile("rwb")
    with open("solution.py", encoding="utf-8") as handle:
        solution = handle.read()

    def send(message: dict) -> None:
        stream.write(json.dumps(message).encode("utf-8") + b"\n")
        stream.flush()

    # Python ignores SIGXFSZ; restoring the default makes an oversized output kill the run.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_FSIZE, limits["output_bytes"])
    _limit(resource.RLIMIT_CPU, limits["cpu_seconds"])
    if limits.get("candidate_uid") is not None:
        _limit(resource.RLIMIT_NPROC, 64)
        os.setgroups([])
        os.setgid(limits["candidate_uid"])
        os.setuid(limits["candidate_uid"])
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])

    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    try:
        exec(compile(solution, "solution.py", "exec"), module.__dict__)
    except MemoryError:
        send({"loaded": False, "memory": True, "error": "MemoryError in the solution"})
        return 0
    except BaseException as error:  # noqa: BLE001 - any failure of the candidate is its verdict
        send({"loaded": False, "error": f"the solution raised {type(error).__name__}: {error}"[:1000]})
        return 0
    objects = _Objects()
    exports = {}
    for name, value in list(vars(module).items()):
        if not name.startswith("__"):
            try:
                exports[name] = objects.encode(value)
            except (ValueError, RecursionError):
                exports[name] = {"$ref": len(objects.by_ref)}
                objects.by_ref[len(objects.by_ref)] = value
    send({"loaded": True, "exports": exports})
    for line in stream:
        send(_answer(objects, json.loads(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
