"""The code oracle's sandbox as a job that is not root runs it.

Not root, the judge and the candidate keep the job's user: the network namespace comes from
`unshare --net --map-root-user`, the candidate starts in a user namespace nested below the
judge's, and the judge makes itself undumpable. CI runs as root, where the sandbox takes the
other path (dropping to uids of its own), so here the oracle runs in a child process as
`nobody` (`setpriv`), from a copy of the oracles package and an interpreter that user can
read; run by another user, the child keeps that user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tokenmill.trainer import oracles
from tokenmill.trainer.oracles import code

NOBODY = 65534

CASES = r'''
import json, os, socket, sys, tempfile, time

sys.path.insert(0, sys.argv[1])
from tokenmill.trainer.oracles import code
from tokenmill.trainer.oracles.code import SandboxLimits, run_candidate

LIMITS = SandboxLimits(timeout_seconds=5, memory_mb=256, output_bytes=64 * 1024)
results = {"euid": os.geteuid(), "report": code.sandbox_report()}


def case(name, candidate, tests, limits=LIMITS):
    verdict = run_candidate(candidate, tests, limits)
    results[name] = {"correct": verdict.correct, "reason": verdict.reason, "detail": verdict.detail,
                     "isolated": verdict.network_isolated}


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


ADD = ["assert add(2, 3) == 5", "from solution import add\nassert add(-1, 1) == 0"]
case("passes", "def add(a, b):\n    return a + b", ADD)
case("fails", "def add(a, b):\n    return a - b", ADD)
case("memory", "block = bytearray(1 << 30)", ["pass"])
case("small-memory", "block = bytearray(1 << 20)", ["assert len(block) == 1 << 20"])
case("output", "print('x' * (1 << 20))", ["pass"])
case("busy", "while True:\n    pass", ["pass"], SandboxLimits(timeout_seconds=1, memory_mb=256))
case("kills-judge", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return a + b",
     ["assert add(2, 3) == 5"])

os.environ["TOKENMILL_TEST_SECRET"] = "hunter2"
case("environment", "import os\nenviron = dict(os.environ)\ncwd = os.getcwd()",
     ["assert 'TOKENMILL_TEST_SECRET' not in environ, environ", "assert 'tokenmill-sandbox-' in cwd, cwd"])

shared = tempfile.mkdtemp(prefix="tokenmill-test-")
os.chmod(shared, 0o777)
pid_file = os.path.join(shared, "grandchild.pid")
case("timeout",
     "import subprocess, sys, time\n"
     "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
     f"open({pid_file!r}, 'w').write(str(child.pid))\n"
     "time.sleep(600)\n",
     ["pass"], SandboxLimits(timeout_seconds=2, memory_mb=256))
grandchild = int(open(pid_file).read())
deadline = time.monotonic() + 60
while not gone(grandchild) and time.monotonic() < deadline:
    time.sleep(0.05)
results["grandchild-gone"] = gone(grandchild)

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
listener.settimeout(0.5)
port = listener.getsockname()[1]
case("network", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", ["pass"])
try:
    listener.accept()
    results["connected"] = True
except socket.timeout:
    results["connected"] = False

code.shutil.which = lambda name: None  # a platform without unshare
code.network_namespace_prefix.cache_clear()
code.candidate_namespace_prefix.cache_clear()
results["report-without-unshare"] = code.sandbox_report()
results["warnings-without-unshare"] = code.sandbox_warnings()
case("without-unshare", "x = 1", ["assert x == 1"])
print(json.dumps(results))
'''


def _oracles_copy(directory: Path) -> None:
    """`tokenmill.trainer.oracles` alone (it needs nothing outside the standard library),
    where an unprivileged user can read it whatever the checkout's permissions."""
    package = directory / "tokenmill"
    trainer = package / "trainer"
    shutil.copytree(Path(oracles.__file__).parent, trainer / "oracles",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (package / "__init__.py").write_text("")
    (trainer / "__init__.py").write_text("")
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def unprivileged():
    """What the cases above gave, run by a user other than root."""
    directory = Path(tempfile.mkdtemp(prefix="tokenmill-test-oracles-"))  # pytest's tmp_path is private
    try:
        _oracles_copy(directory)
        script = directory / "cases.py"
        script.write_text(CASES)
        script.chmod(0o644)
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv (util-linux): no way to start the oracle as "
                            "another user")
            executable, environment = code.sandbox_python()
            if code.unprivileged_uid() is None:
                pytest.skip("no interpreter here runs as nobody, so the oracle cannot either")
            argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
                    executable, "-I", str(script), str(directory)]
        else:
            executable, environment = sys.executable, {}
            argv = [executable, "-I", str(script), str(directory)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=directory,
                              env={"PATH": os.defpath, "TMPDIR": tempfile.gettempdir(), **environment})
        assert done.returncode == 0, done.stderr[-3000:]
        yield json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_oracle_ran_without_root(unprivileged):
    assert unprivileged["euid"] != 0
    assert unprivileged["report"]["unprivilegedUser"] is True


def test_passes_and_fails(unprivileged):
    assert (unprivileged["passes"]["correct"], unprivileged["passes"]["reason"]) == (True, "correct")
    failed = unprivileged["fails"]
    assert (failed["correct"], failed["reason"]) == (False, "test-failed")
    assert "test[0]" in failed["detail"] and "AssertionError" in failed["detail"]


def test_time_limit_kills_the_process_group(unprivileged):
    assert (unprivileged["timeout"]["correct"], unprivileged["timeout"]["reason"]) == (False, "timeout")
    assert unprivileged["grandchild-gone"] is True
    assert unprivileged["busy"]["reason"] == "timeout"


def test_memory_limit(unprivileged):
    assert (unprivileged["memory"]["correct"], unprivileged["memory"]["reason"]) == (False, "memory-limit")
    assert unprivileged["small-memory"]["correct"], unprivileged["small-memory"]


def test_output_is_capped(unprivileged):
    assert (unprivileged["output"]["correct"], unprivileged["output"]["reason"]) == (False, "output-limit")


def test_environment_is_clean(unprivileged):
    assert unprivileged["environment"]["correct"], unprivileged["environment"]["detail"]


def test_no_network(unprivileged):
    if not unprivileged["report"]["networkNamespace"]:
        assert unprivileged["network"]["isolated"] is False  # and the verdict says so
        pytest.skip("this platform gives an unprivileged user no network namespace (unshare --net "
                    "--map-root-user fails); verdicts say network_isolated=False")
    network = unprivileged["network"]
    assert (network["correct"], network["reason"], network["isolated"]) == (False, "error", True)
    assert "unreachable" in network["detail"].lower() or "refused" in network["detail"].lower()
    assert unprivileged["connected"] is False


def test_a_candidate_that_ends_the_judge_fails(unprivileged):
    if unprivileged["report"]["networkNamespace"]:
        assert unprivileged["report"]["judgeSeparated"] is True
    # it keeps the judge's uid, so its signal can end the judge: the verdict is an error, never a pass
    ended = unprivileged["kills-judge"]
    assert (ended["correct"], ended["reason"]) == (False, "error"), ended


def test_says_when_there_is_no_network_namespace(unprivileged):
    assert unprivileged["report-without-unshare"]["networkNamespace"] is False
    assert any("no network namespace" in warning for warning in unprivileged["warnings-without-unshare"])
    verdict = unprivileged["without-unshare"]
    assert (verdict["correct"], verdict["isolated"]) == (True, False)
