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

import atexit
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenmill.trainer.oracles import sandbox_candidate, sandbox_runner
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
JUDGE_UID = 65533
"""Run as root, the judge drops to this uid: another than the candidate's, so the candidate
can neither signal nor trace it."""
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_RUNNER = Path(sandbox_runner.__file__).resolve()
_CANDIDATE = Path(sandbox_candidate.__file__).resolve()
_JUDGE_REASONS = {CORRECT, ERROR, MEMORY_LIMIT, OUTPUT_LIMIT, TEST_FAILED, TIMEOUT}


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
def candidate_namespace_prefix() -> tuple[str, ...]:
    """Not root, inside a network namespace of its own (`unshare --map-root-user`), the judge has
    every capability there; the candidate then starts in a user namespace nested below it, so
    none of them reach the judge. Empty where that is not needed or not possible."""
    isolation = network_namespace_prefix()
    if os.geteuid() == 0 or isolation is None:
        return ()
    prefix = (isolation[0], "--user", "--map-root-user", "--")
    try:
        probe = subprocess.run([*isolation, *prefix, sys.executable, "-c", ""], capture_output=True, timeout=30,
                               env={"PATH": os.defpath})
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if probe.returncode == 0 else ()


_SKIPPED_LIBRARY = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                    "lib2to3"}


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


_SANDBOX_PYTHON_LOCK = threading.Lock()


def sandbox_python() -> tuple[str, dict[str, str]]:
    with _SANDBOX_PYTHON_LOCK:  # judged in threads: one copy per process
        return _sandbox_python()


@functools.lru_cache(maxsize=1)
def _sandbox_python() -> tuple[str, dict[str, str]]:
    """The interpreter the sandbox runs (and its extra environment): this one, or, run as root
    with an interpreter unprivileged users cannot read (under root's home), a copy of it and its
    standard library (hard links where the file system allows) in a world-readable temporary
    directory, removed at exit."""
    if os.geteuid() != 0 or _runs_unprivileged(sys.executable, {}):
        return sys.executable, {}
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    copy = Path(tempfile.mkdtemp(prefix="tokenmill-sandbox-python-"))
    atexit.register(shutil.rmtree, copy, True)
    try:
        copy.chmod(0o755)
        (copy / "bin").mkdir(mode=0o755)
        (copy / "lib").mkdir(mode=0o755)
        _link_or_copy(os.path.realpath(sys._base_executable), str(copy / "bin" / version))  # type: ignore[attr-defined]
        for library in (base / "lib").glob("libpython*.so*"):
            _link_or_copy(str(library.resolve()), str(copy / "lib" / library.name))
        shutil.copytree(base / "lib" / version, copy / "lib" / version, copy_function=_link_or_copy,
                        ignore=lambda directory, names: [n for n in names if n in _SKIPPED_LIBRARY])
        for directory in [copy, *(path for path in copy.rglob("*") if path.is_dir())]:
            directory.chmod(0o755)
    except OSError:
        return sys.executable, {}
    executable = str(copy / "bin" / version)
    environment = {"LD_LIBRARY_PATH": str(copy / "lib")}  # its runpath points under root's home
    return (executable, environment) if _runs_unprivileged(executable, environment) else (sys.executable, {})


def _runs_unprivileged(executable: str, environment: dict[str, str]) -> bool:
    probe_code = (f"import os; os.setgroups([]); os.setgid({NOBODY_UID}); os.setuid({NOBODY_UID}); "
                  "import socket, subprocess, json, decimal, sys; "
                  "subprocess.run([sys.executable, '-c', ''], check=True)")
    try:
        probe = subprocess.run([executable, "-I", "-c", probe_code], capture_output=True, timeout=60,
                               env={"PATH": os.defpath, **environment}, cwd=tempfile.gettempdir())
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=1)
def unprivileged_uid() -> int | None:
    """The uid a candidate runs as when this process is root: `nobody`, where the sandbox's
    interpreter lets it; None otherwise."""
    if os.geteuid() != 0:
        return None
    executable, environment = sandbox_python()
    return NOBODY_UID if _runs_unprivileged(executable, environment) else None


def sandbox_report() -> dict[str, bool]:
    """What this platform's sandbox enforces, for the job's log and manifest."""
    root = os.geteuid() == 0
    return {
        "networkNamespace": network_namespace_prefix() is not None,
        "unprivilegedUser": not root or unprivileged_uid() is not None,
        # the candidate cannot trace the judge nor open its result pipe; not root, it keeps the
        # judge's uid and can still end it with a signal, which makes the verdict an error
        "judgeSeparated": unprivileged_uid() is not None if root
        else network_namespace_prefix() is None or bool(candidate_namespace_prefix()),
    }


def sandbox_warnings() -> list[str]:
    """What this platform's sandbox cannot enforce, in words for the job's log and manifest."""
    report = sandbox_report()
    warnings = []
    if not report["networkNamespace"]:
        warnings.append("code oracle: this platform gives the sandbox no network namespace (unshare --net "
                        "fails): candidates run with the host's network")
    if not report["unprivilegedUser"]:
        warnings.append("code oracle: running as root, the sandbox cannot drop candidates to an unprivileged "
                        "user (the interpreter is not readable by nobody)")
    if not report["judgeSeparated"]:
        warnings.append("code oracle: candidates run as the judge's user without a namespace of their own")
    return warnings


def run_candidate(code: str, tests: Sequence[str], limits: SandboxLimits) -> Verdict:
    """Runs `code` in one process and each test, in order, in another (the judge), which calls
    into the first; passes when every test runs without raising."""
    isolation = network_namespace_prefix()
    candidate_uid = unprivileged_uid()
    executable, extra_environment = sandbox_python()
    with tempfile.TemporaryDirectory(prefix="tokenmill-sandbox-") as directory:
        workdir = Path(directory)
        candidate_dir = workdir / "candidate"
        candidate_dir.mkdir(mode=0o700)
        (candidate_dir / "solution.py").write_text(code, encoding="utf-8")
        (workdir / "tests.json").write_text(json.dumps(list(tests)), encoding="utf-8")
        if candidate_uid is not None:
            workdir.chmod(0o711)  # the judge's uid may pass through, not list
            for path in (candidate_dir, candidate_dir / "solution.py"):
                os.chown(path, candidate_uid, candidate_uid)
        result_read, result_write = os.pipe()
        runner_limits = {
            "memory_bytes": limits.memory_mb << 20,
            "cpu_seconds": max(1, int(limits.timeout_seconds) + 1),
            "output_bytes": limits.output_bytes,
            "candidate_uid": candidate_uid,
            "judge_uid": JUDGE_UID if candidate_uid is not None else None,
            "candidate_prefix": list(candidate_namespace_prefix()),
            "candidate_script": str(_CANDIDATE),
            "result_fd": result_write,
        }
        argv = [*(isolation or ()), executable, "-I", str(_RUNNER), json.dumps(runner_limits)]
        environment = {"PATH": os.defpath, "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8",
                       **extra_environment}
        try:
            with open(workdir / "stdout", "wb") as stdout, open(workdir / "stderr", "wb") as stderr:
                process = subprocess.Popen(argv, cwd=directory, env=environment, stdin=subprocess.DEVNULL,
                                           stdout=stdout, stderr=stderr, start_new_session=True,
                                           pass_fds=(result_write,))
                os.close(result_write)
                result_write = -1
                timed_out = False
                try:
                    process.wait(timeout=limits.timeout_seconds)
                except subprocess.TimeoutExpired:
                    timed_out = True
                _kill_group(process.pid)
                process.wait()
            result = _read_result(result_read)
        finally:
            os.close(result_read)
            if result_write >= 0:
                os.close(result_write)
        message = _tail(workdir / "stderr")
    return _verdict(process.returncode, timed_out, result, message, limits, isolation is not None)


def _read_result(descriptor: int) -> dict | None:
    """What the judge wrote to its pipe; only the judge ever held the pipe's write end."""
    os.set_blocking(descriptor, False)
    chunks = []
    try:
        while chunk := os.read(descriptor, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    try:
        result = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return result if isinstance(result, dict) and result.get("reason") in _JUDGE_REASONS else None


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group already ended


def _tail(path: Path, chars: int = 1000) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - chars * 4))
        return handle.read().decode("utf-8", "replace")[-chars:].strip()


def _verdict(returncode: int, timed_out: bool, result: dict | None, message: str, limits: SandboxLimits,
             isolated: bool) -> Verdict:
    def verdict(correct: bool, reason: str, detail: str) -> Verdict:
        return Verdict(correct, reason, detail, network_isolated=isolated)

    if timed_out or (result is not None and result["reason"] == TIMEOUT):
        return verdict(False, TIMEOUT, f"ran past the {limits.timeout_seconds:g} s limit")
    if returncode == -signal.SIGXFSZ or (result is not None and result["reason"] == OUTPUT_LIMIT):
        return verdict(False, OUTPUT_LIMIT, f"wrote more than {limits.output_bytes} bytes")
    if result is None:
        return verdict(False, ERROR, message or f"the judge reported nothing (exit status {returncode})")
    if result["reason"] == MEMORY_LIMIT:
        return verdict(False, MEMORY_LIMIT, str(result.get("detail")) or f"ran out of its {limits.memory_mb} MB")
    return verdict(result["reason"] == CORRECT, result["reason"], str(result.get("detail", "")))


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
