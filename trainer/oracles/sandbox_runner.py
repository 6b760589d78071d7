"""The judge of the code oracle's sandbox: runs the tests against a candidate in another process.

Started by `code.run_candidate` as a script (never imported by the workload):
`python -I sandbox_runner.py LIMITS_JSON` in a fresh temporary directory holding `tests.json`
and the candidate's directory `candidate/` (with `solution.py`); the write end of the result
pipe is the fd `result_fd` of the limits, and this process alone holds it.

The candidate runs in a process of its own (`sandbox_candidate.py`), started with nothing
open but one socket: the judge sees its top-level names as proxies, and every call or
attribute read is a request over the socket whose answer comes back as plain data or as a
reference. The tests, their assertions and the verdict stay here, so a candidate can only
answer calls: it cannot patch the tests, reach the result pipe, or forge the verdict by
exiting, printing, or writing files. Comparisons of the candidate's answers run on values
the judge decoded itself (an object whose `__eq__` says yes to everything never leaves the
candidate). When started as root the judge drops to a uid of its own, another than the
candidate's; otherwise it makes itself undumpable, so the candidate cannot trace it or open
its file descriptors through /proc.
"""

import builtins
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import types

MAX_ANSWER_BYTES = 16 << 20
PR_SET_DUMPABLE = 4


class CandidateGone(Exception):
    """The candidate's process ended while the judge was waiting for its answer."""


class Remote:
    """An object that lives in the candidate's process: it can be called and its attributes read."""

    __slots__ = ("_channel", "_ref", "_name")

    def __init__(self, channel: "Channel", ref: int, name: str) -> None:
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return self._channel.request({"op": "call", "target": self._ref, "args": self._channel.encode(list(args)),
                                      "kwargs": self._channel.encode(kwargs)}, f"{self._name}(...)")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._channel.request({"op": "getattr", "target": self._ref, "name": name}, f"{self._name}.{name}")

    def _method(self, name: str, *args):
        return self._attribute(name)(*args)

    def _attribute(self, name: str):
        return self._channel.request({"op": "getattr", "target": self._ref, "name": name}, f"{self._name}.{name}")

    def __len__(self):
        return self._method("__len__")

    def __getitem__(self, key):
        return self._method("__getitem__", key)

    def __setitem__(self, key, value):
        self._method("__setitem__", key, value)

    def __contains__(self, item):
        return self._method("__contains__", item)

    def __repr__(self) -> str:
        return f"<candidate object {self._name}>"


def _exception_type(name: str, memory: bool) -> type:
    """The class a candidate's exception is raised as here: a subclass of the built-in of that
    name (so `except ValueError` works), never one that ends the judge."""
    if memory:
        return type(name, (MemoryError,), {})
    base = getattr(builtins, name, None)
    if isinstance(base, type) and issubclass(base, Exception) and base is not StopIteration:
        return type(name, (base,), {})
    return type(name, (Exception,), {})


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.stream = sock.makefile("rwb")

    def receive(self) -> dict:
        line = self.stream.readline(MAX_ANSWER_BYTES)
        if not line:
            raise CandidateGone("the candidate's process ended")
        if not line.endswith(b"\n"):
            raise ValueError(f"the candidate's answer is larger than {MAX_ANSWER_BYTES} bytes")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("the candidate's answer is not an object")
        return message

    def request(self, message: dict, name: str):
        try:
            self.stream.write(json.dumps(message).encode("utf-8") + b"\n")
            self.stream.flush()
        except OSError:
            raise CandidateGone("the candidate's process ended") from None
        answer = self.receive()
        if "raised" in answer:
            raise _exception_type(str(answer["raised"]), bool(answer.get("memory")))(str(answer.get("message", "")))
        return self.decode(answer.get("value"), name)

    def encode(self, value):
        if isinstance(value, Remote):
            return {"$ref": value._ref}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": bytes(value).hex()}
        if isinstance(value, list):
            return [self.encode(item) for item in value]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(item) for item in value]}
        if isinstance(value, (set, frozenset)):
            return {"$set": [self.encode(item) for item in value]}
        if isinstance(value, dict):
            return {"$dict": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        raise TypeError(f"cannot pass a {type(value).__name__} to the candidate (plain data only)")

    def decode(self, value, name: str):
        if isinstance(value, list):
            return [self.decode(item, name) for item in value]
        if not isinstance(value, dict):
            return value
        if "$ref" in value:
            return Remote(self, int(value["$ref"]), name)
        if "$bytes" in value:
            return bytes.fromhex(value["$bytes"])
        if "$tuple" in value:
            return tuple(self.decode(item, name) for item in value["$tuple"])
        if "$set" in value:
            return {self.decode(item, name) for item in value["$set"]}
        return {self.decode(k, name): self.decode(v, name) for k, v in value["$dict"]}


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _undumpable() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: no /proc to reach the judge through


def _gone(process: subprocess.Popen) -> dict:
    try:
        status = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        status = None
    if status == -signal.SIGXFSZ:
        return {"reason": "output-limit", "detail": "the candidate wrote past its output limit"}
    if status == -signal.SIGXCPU:
        return {"reason": "timeout", "detail": "the candidate ran past its CPU-time limit"}
    if status == -signal.SIGKILL:
        return {"reason": "memory-limit", "detail": "the candidate was killed (out of memory)"}
    return {"reason": "error", "detail": f"the candidate exited (status {status}) before its tests finished"}


def judge(tests: list, channel: Channel, process: subprocess.Popen) -> dict:
    try:
        hello = channel.receive()
    except CandidateGone:
        return _gone(process)
    if not hello.get("loaded"):
        return {"reason": "memory-limit" if hello.get("memory") else "error", "detail": str(hello.get("error", ""))}
    exports = {str(name): channel.decode(value, str(name)) for name, value in dict(hello["exports"]).items()}
    module = types.ModuleType("solution")
    module.__dict__.update(exports)
    sys.modules["solution"] = module
    namespace = {"__name__": "__tests__", **exports}
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"test[{index}]", "exec"), namespace)
        except CandidateGone:
            return _gone(process)
        except MemoryError as error:
            return {"reason": "memory-limit", "detail": f"MemoryError in test[{index}]: {error}"}
        except BaseException as error:  # noqa: BLE001 - a failing test is the verdict
            return {"reason": "test-failed", "detail": f"test[{index}] failed: {type(error).__name__}: {error}"}
    return {"reason": "correct", "detail": "every test passed"}


def main() -> int:
    limits = json.loads(sys.argv[1])
    result_fd = int(limits["result_fd"])
    _undumpable()
    with open("tests.json", encoding="utf-8") as handle:
        tests = json.load(handle)
    ours, theirs = socket.socketpair()
    candidate_limits = {key: limits[key] for key in ("memory_bytes", "cpu_seconds", "output_bytes", "candidate_uid")}
    candidate_limits["socket_fd"] = theirs.fileno()
    argv = [*limits["candidate_prefix"], sys.executable, "-I", limits["candidate_script"],
            json.dumps(candidate_limits)]
    with open("candidate/stdout", "wb") as stdout, open("candidate/stderr", "wb") as stderr:
        process = subprocess.Popen(argv, cwd="candidate", stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   pass_fds=(theirs.fileno(),))  # close_fds: the result pipe stays here
    theirs.close()

    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_FSIZE, limits["output_bytes"])
    if limits.get("judge_uid") is not None:
        os.setgroups([])
        os.setgid(limits["judge_uid"])
        os.setuid(limits["judge_uid"])
    _limit(resource.RLIMIT_AS, limits["memory_bytes"] + (256 << 20))
    verdict = judge(tests, Channel(ours), process)
    os.write(result_fd, json.dumps(verdict).encode("utf-8")[:60000])
    os.close(result_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
