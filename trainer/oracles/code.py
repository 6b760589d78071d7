"""Python code against unit tests, in a sandboxed subprocess.

The candidate is the last fenced code block of the completion (or the whole completion when
there is none). It runs with its tests in a fresh temporary directory, in a new session
(its whole process group is killed on timeout), with a clean environment, an address-space
limit, a CPU-time limit, a cap on every file it writes (its stdout and stderr included), no
core dumps, and no network: a new network namespace through `unshare` where the platform
allows it (`Verdict.network_isolated` says whether it did). Run as root, the candidate drops
to the unprivileged `nobody` user first where the interpreter lets it (`sandbox_report()`). No command line is built from user text: the
candidate and tests travel as files.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenmill.trainer.oracles import sandbox_runner
from tokenmill.trainer.oracles.base import (
    CORRECT,
    ERROR,
    MEMORY_LIMIT,
    NO_ANSWER,
    OUTPUT_LIMIT,
    TEST_FAILED,
    TIMEOUT,
    Problem,
    Verdict,
)

KIND = "code"
NOBODY_UID = 65534
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_RUNNER = Path(sandbox_runner.__file__).resolve()


@dataclass(frozen=True)
class SandboxLimits:
    timeout_seconds: float = 10.0
    """Wall-clock limit of one run; the process group is killed when it passes."""
    memory_mb: int = 1024
    """Address-space limit."""
    output_bytes: int = 1 << 20
    """Largest file (stdout and stderr included) the candidate may write."""


def extract_code(completion: str) -> str:
    """The last fenced code block (Python or unlabelled), else the completion itself."""
    blocks = [body for language, body in _FENCE.findall(completion)
              if language.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else completion


def tests_of(problem: Problem) -> list[str]:
    tests = problem["tests"]
    return [tests] if isinstance(tests, str) else list(tests)


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...] | None:
    """The `unshare` argv prefix that gives a child its own empty network namespace, if any."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    prefix = (unshare, "--net") if os.geteuid() == 0 else (unshare, "--net", "--map-root-user")
    try:
        probe = subprocess.run([*prefix, "--", sys.executable, "-c", ""], capture_output=True,
                               timeout=30, env={"PATH": os.defpath})
    except (OSError, subprocess.SubprocessError):
        return None
    return (*prefix, "--") if probe.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def unprivileged_uid() -> int | None:
    """The uid a candidate runs as when this process is root: `nobody`, where it can still
    import the standard library (an interpreter under root's home cannot); None otherwise."""
    if os.geteuid() != 0:
        return None
    probe_code = (f"import os; os.setgroups([]); os.setgid({NOBODY_UID}); os.setuid({NOBODY_UID}); "
                  "import socket, subprocess, json, decimal")
    try:
        probe = subprocess.run([sys.executable, "-I", "-c", probe_code], capture_output=True,
                               timeout=30, env={"PATH": os.defpath}, cwd=tempfile.gettempdir())
    except (OSError, subprocess.SubprocessError):
        return None
    return NOBODY_UID if probe.returncode == 0 else None


def sandbox_report() -> dict[str, bool]:
    """What this platform's sandbox enforces, for the job's log and manifest."""
    return {
        "networkNamespace": network_namespace_prefix() is not None,
        "unprivilegedUser": os.geteuid() != 0 or unprivileged_uid() is not None,
    }


def run_candidate(code: str, tests: Sequence[str], limits: SandboxLimits) -> Verdict:
    """Runs `code` then each test in order; passes when every test runs without raising."""
    isolation = network_namespace_prefix()
    nonce = secrets.token_hex(16)
    drop_to_uid = unprivileged_uid()
    with tempfile.TemporaryDirectory(prefix="tokenmill-sandbox-") as directory:
        workdir = Path(directory)
        (workdir / "solution.py").write_text(code, encoding="utf-8")
        (workdir / "tests.json").write_text(json.dumps(list(tests)), encoding="utf-8")
        if drop_to_uid is not None:
            for path in (workdir, workdir / "solution.py", workdir / "tests.json"):
                os.chown(path, drop_to_uid, drop_to_uid)
        runner_limits = {
            "memory_bytes": limits.memory_mb << 20,
            "cpu_seconds": max(1, int(limits.timeout_seconds) + 1),
            "output_bytes": limits.output_bytes,
            "drop_to_uid": drop_to_uid,
        }
        argv = [*(isolation or ()), sys.executable, "-I", str(_RUNNER), json.dumps(runner_limits)]
        environment = {"PATH": os.defpath, "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8"}
        with open(workdir / "stdout", "wb") as stdout, open(workdir / "stderr", "wb") as stderr:
            process = subprocess.Popen(argv, cwd=directory, env=environment, stdin=subprocess.PIPE,
                                       stdout=stdout, stderr=stderr, start_new_session=True)
            timed_out = False
            try:
                process.stdin.write(f"{nonce}\n".encode())  # type: ignore[union-attr]
                process.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
            try:
                process.wait(timeout=limits.timeout_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process.pid)
            process.wait()
        message = _tail(workdir / "stderr")
        passed = _passed(workdir / "result.json", nonce)
    return _verdict(process.returncode, timed_out, passed, message, limits, isolation is not None)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group already ended


def _tail(path: Path, chars: int = 1000) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - chars * 4))
        return handle.read().decode("utf-8", "replace")[-chars:].strip()


def _passed(path: Path, nonce: str) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("nonce") == nonce
    except (OSError, ValueError, AttributeError):
        return False


def _verdict(returncode: int, timed_out: bool, passed: bool, message: str, limits: SandboxLimits,
             isolated: bool) -> Verdict:
    def verdict(correct: bool, reason: str, detail: str) -> Verdict:
        return Verdict(correct, reason, detail, network_isolated=isolated)

    if timed_out or returncode == -signal.SIGXCPU:
        return verdict(False, TIMEOUT, f"ran past the {limits.timeout_seconds:g} s limit")
    if returncode == -signal.SIGXFSZ:
        return verdict(False, OUTPUT_LIMIT, f"wrote more than {limits.output_bytes} bytes")
    if returncode == sandbox_runner.EXIT_MEMORY or returncode == -signal.SIGKILL:
        return verdict(False, MEMORY_LIMIT, message or f"ran out of its {limits.memory_mb} MB")
    if returncode == sandbox_runner.EXIT_TEST_FAILED:
        return verdict(False, TEST_FAILED, message)
    if returncode == sandbox_runner.EXIT_PASSED and passed:
        return verdict(True, CORRECT, "every test passed")
    if returncode == sandbox_runner.EXIT_PASSED:
        return verdict(False, ERROR, "the candidate exited before its tests finished")
    return verdict(False, ERROR, message or f"exit status {returncode}")


class CodeOracle:
    """Runs the completion's code against the problem's `tests` (Python source, one or a list)."""

    kind = KIND

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()

    def problem_error(self, problem: Problem) -> str | None:
        tests = problem.get("tests")
        if tests is None or (isinstance(tests, (str, list, tuple)) and not tests):
            return "tests: a code problem needs unit tests"
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in tests):
            return "tests: must be Python source, or a list of non-empty Python sources"
        for index, test in enumerate(tests):
            try:
                compile(test, f"tests[{index}]", "exec")
            except SyntaxError as error:
                return f"tests[{index}]: not valid Python ({error.msg}, line {error.lineno})"
        return None

    def check(self, problem: Problem, completion: str) -> Verdict:
        code = extract_code(completion)
        if not code.strip():
            return Verdict(False, NO_ANSWER, "the completion holds no code")
        return run_candidate(code, tests_of(problem), self.limits)
