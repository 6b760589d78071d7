"""Oracles: math equivalence through math-verify, code in a sandbox, multiple choice."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tokenmill.trainer.oracles import (
    ORACLE_CRASHED,
    OracleInputError,
    Verdict,
    check_problems,
    make_oracle,
    safe_check,
)
from tokenmill.trainer.oracles.code import (
    CodeOracle,
    SandboxLimits,
    extract_code,
    network_namespace_prefix,
    run_candidate,
)
from tokenmill.trainer.oracles.math import MathOracle, equivalent, extract_answer, normalise_answer
from tokenmill.trainer.oracles.multiple_choice import MultipleChoiceOracle, extract_choice

LIMITS = SandboxLimits(timeout_seconds=5, memory_mb=256, output_bytes=64 * 1024)


# ---- math -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        (r"so the total is \boxed{\frac{3}{4}}, done", r"\frac{3}{4}", "boxed"),
        (r"first \boxed{1} then \boxed{x^{2}+1}", "x^{2}+1", "boxed"),
        ("Adding up, the answer is 1,250.", "1,250", "answer-is"),
        ("Final answer: $x+1$.", "x+1", "answer-is"),
        ("5 apples and 7 pears make 12", "12", "last-number"),
        ("She had -3.5 left", "-3.5", "last-number"),
    ],
)
def test_math_extracts_the_final_answer(text, answer, method):
    assert extract_answer(text) == (answer, method)


def test_math_normalised_answer_is_a_comparison_key():
    assert normalise_answer(" $1,000$. ") == normalise_answer("1,000") == "1,000"
    assert normalise_answer(r"x + \, 1") == "x+1"


def test_math_finds_no_answer_in_prose():
    assert extract_answer("I am not sure how to do this.") is None
    verdict = MathOracle().check({"answer": "3"}, "I am not sure how to do this.")
    assert (verdict.correct, verdict.reason) == (False, "no-answer")


@pytest.mark.parametrize(
    ("gold", "candidate"),
    [
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\dfrac{1}{2}"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("x+1", "1+x"),
        ("1000", "1,000"),
        ("7", "7.0"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("50\\%", "0.5"),
    ],
)
def test_math_equivalent_answers(gold, candidate):
    assert equivalent(gold, candidate)
    assert MathOracle().check({"answer": gold}, rf"The result is \boxed{{{candidate}}}.").correct


@pytest.mark.parametrize(
    ("gold", "candidate"),
    [("3", "4"), ("-3", "3"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("x+1", "x-1"), (r"\sqrt{2}", "2")],
)
def test_math_different_answers(gold, candidate):
    assert not equivalent(gold, candidate)
    verdict = MathOracle().check({"answer": gold}, rf"\boxed{{{candidate}}}")
    assert (verdict.correct, verdict.reason, verdict.extracted) == (False, "wrong-answer", candidate)


def test_math_verifies_outside_the_main_thread():
    # math-verify bounds its work with SIGALRM, which a thread cannot use: a tower of powers
    # would run for ever there, and must come back as not equal instead.
    completions = [r"\boxed{1/2}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{0.25}"]
    verdicts: list[Verdict] = []
    workers = [threading.Thread(target=lambda text=text: verdicts.append(MathOracle().check({"answer": 0.5}, text)))
               for text in completions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted((v.extracted, v.correct) for v in verdicts) == [
        ("0.25", False), ("1/2", True), ("9^{9^{9^{9}}}", False)]


def test_math_pathological_answer_on_the_main_thread_is_bounded():
    assert not equivalent("1", "9^{9^{9^{9}}}")


# ---- code -----------------------------------------------------------------------------------

def test_code_extracts_the_last_python_block():
    completion = "Try:\n```python\ndef f(): return 1\n```\nBetter:\n```python\ndef f(): return 2\n```\n"
    assert extract_code(completion) == "def f(): return 2\n"
    assert extract_code("def f(): return 3") == "def f(): return 3"
    assert extract_code("```bash\nrm -rf /\n```\ndef g(): pass") == "```bash\nrm -rf /\n```\ndef g(): pass"


def test_code_passes_and_fails():
    oracle = CodeOracle(LIMITS)
    problem = {"tests": ["assert add(2, 3) == 5", "from solution import add\nassert add(-1, 1) == 0"]}
    passed = oracle.check(problem, "```python\ndef add(a, b):\n    return a + b\n```")
    assert (passed.correct, passed.reason) == (True, "correct")
    failed = oracle.check(problem, "```python\ndef add(a, b):\n    return a - b\n```")
    assert (failed.correct, failed.reason) == (False, "test-failed")
    assert "test[0]" in failed.detail and "AssertionError" in failed.detail
    broken = oracle.check(problem, "def add(a, b) return a")
    assert (broken.correct, broken.reason) == (False, "error")
    assert "SyntaxError" in broken.detail


def test_code_exiting_early_does_not_pass():
    for escape in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)"):
        verdict = run_candidate(escape, ["assert False"], LIMITS)
        assert not verdict.correct, escape


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie or dead
    except FileNotFoundError:
        return True


def test_code_timeout_kills_the_process_group():
    import shutil
    import tempfile
    from pathlib import Path

    shared = Path(tempfile.mkdtemp(prefix="tokenmill-test-"))  # pytest's tmp_path is private to this user
    shared.chmod(0o777)  # the candidate may run as an unprivileged user
    pid_file = shared / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    verdict = run_candidate(code, ["pass"], SandboxLimits(timeout_seconds=2, memory_mb=256))
    assert (verdict.correct, verdict.reason) == (False, "timeout")
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while not _process_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(shared)
    assert _process_gone(grandchild)


def test_code_busy_loop_times_out():
    verdict = run_candidate("while True:\n    pass", ["pass"], SandboxLimits(timeout_seconds=1, memory_mb=256))
    assert verdict.reason == "timeout"


def test_code_memory_limit():
    verdict = run_candidate("block = bytearray(1 << 30)", ["pass"], LIMITS)
    assert (verdict.correct, verdict.reason) == (False, "memory-limit")
    assert run_candidate("block = bytearray(1 << 20)", ["assert len(block) == 1 << 20"], LIMITS).correct


def test_code_huge_output_is_cut_off():
    verdict = run_candidate("print('x' * (1 << 20))", ["pass"], LIMITS)
    assert (verdict.correct, verdict.reason) == (False, "output-limit")
    assert run_candidate("print('x' * 100)", ["pass"], LIMITS).correct


def test_code_environment_is_clean(monkeypatch):
    monkeypatch.setenv("TOKENMILL_TEST_SECRET", "hunter2")
    code = "import os\nenviron = dict(os.environ)\ncwd = os.getcwd()"
    verdict = run_candidate(code, ["assert 'TOKENMILL_TEST_SECRET' not in environ, environ",
                                   "assert 'tokenmill-sandbox-' in cwd, cwd"], LIMITS)
    assert verdict.correct, verdict.detail


def test_code_has_no_network():
    if network_namespace_prefix() is None:
        pytest.skip("this platform cannot create a network namespace (unshare --net fails); "
                    "verdicts say network_isolated=False")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        verdict = run_candidate(code, ["pass"], LIMITS)
        assert (verdict.correct, verdict.reason, verdict.network_isolated) == (False, "error", True)
        assert "unreachable" in verdict.detail.lower() or "refused" in verdict.detail.lower()
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_code_says_when_it_cannot_isolate_the_network(monkeypatch):
    from tokenmill.trainer.oracles import code

    monkeypatch.setattr(code.shutil, "which", lambda name: None)  # a platform without unshare
    code.network_namespace_prefix.cache_clear()
    try:
        verdict = run_candidate("x = 1", ["assert x == 1"], LIMITS)
        assert (verdict.correct, verdict.network_isolated) == (True, False)
        assert code.sandbox_report()["networkNamespace"] is False
    finally:
        code.network_namespace_prefix.cache_clear()


FORGED_VERDICT = '{"reason": "correct", "detail": "every test passed"}'

FORGERIES = {
    "exits early with success": "import os\nos._exit(0)",
    "exits inside the call": "import os\ndef add(a, b):\n    os._exit(0)",
    "prints the success line": (
        "import sys\n"
        f"print({FORGED_VERDICT!r})\nprint({FORGED_VERDICT!r}, file=sys.stderr)\n"
        "def add(a, b):\n    return 0"),
    "answers yes to every comparison": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Yes()"),
    "patches the harness it can see": (
        "import builtins, sys\n"
        "builtins.AssertionError = type('Never', (Exception,), {})\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    for name, value in list(frame.f_globals.items()):\n"
        "        if callable(value) and name in ('judge', '_answer', 'main', 'send'):\n"
        "            frame.f_globals[name] = lambda *a, **k: {'reason': 'correct', 'loaded': True, 'exports': {}}\n"
        "    frame = frame.f_back\n"
        "def add(a, b):\n    return a - b"),
    "writes a forged verdict to every descriptor and the judge's": (
        "import os, json\n"
        f"line = {FORGED_VERDICT!r}.encode()\n"
        "for fd in range(3, 256):\n"
        "    try:\n        os.write(fd, line)\n    except OSError:\n        pass\n"
        "for name in os.listdir('/proc/%d/fd' % os.getppid()) if os.access('/proc/%d/fd' % os.getppid(), os.R_OK) "
        "else []:\n"
        "    try:\n"
        "        with open('/proc/%d/fd/%s' % (os.getppid(), name), 'wb') as handle:\n"
        "            handle.write(line)\n"
        "    except OSError:\n        pass\n"
        "for path in ('result.json', '../result.json'):\n"
        "    try:\n        open(path, 'w').write(line.decode())\n    except OSError:\n        pass\n"
        "os._exit(0)"),
    "reads the harness's secrets and writes its result file": (
        "import gc, json, os, sys\n"
        "secrets = [v for f in [sys._getframe()] for v in f.f_back.f_locals.values() if isinstance(v, str)] "
        "if sys._getframe().f_back else []\n"
        "secrets += [o for o in gc.get_objects() if isinstance(o, str) and len(o) == 32][:50]\n"
        "for secret in secrets:\n"
        "    for path in ('result.json', '../result.json'):\n"
        "        try:\n"
        "            open(path, 'w').write(json.dumps({'nonce': secret, 'passed': 1, 'reason': 'correct'}))\n"
        "        except OSError:\n            pass\n"
        "os._exit(0)"),
    "kills the judge": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return a + b",
}


@pytest.mark.parametrize("forgery", list(FORGERIES), ids=list(FORGERIES))
def test_code_a_candidate_cannot_forge_a_pass(forgery):
    verdict = run_candidate(FORGERIES[forgery], ["assert add(2, 3) == 5"], LIMITS)
    assert not verdict.correct, (forgery, verdict)
    assert verdict.reason in ("error", "test-failed"), verdict


def test_code_candidate_objects_work_through_the_judge():
    code = (
        "class Stack:\n"
        "    def __init__(self):\n        self.items = []\n"
        "    def push(self, item):\n        self.items.append(item)\n"
        "    def pop(self):\n        return self.items.pop()\n"
        "    def __len__(self):\n        return len(self.items)\n"
        "def root(x):\n"
        "    if x < 0:\n        raise ValueError('negative')\n"
        "    return x ** 0.5, {'x': x}\n"
        "table = {(1, 2): b'ab', 'set': {3}}\n"
    )
    tests = ["s = Stack()\ns.push([1, 'a'])\nassert len(s) == 1 and s.items == [[1, 'a']]\n"
             "assert s.pop() == [1, 'a'] and len(s) == 0",
             "assert root(4) == (2.0, {'x': 4})\n"
             "try:\n    root(-1)\nexcept ValueError as error:\n    assert 'negative' in str(error)\n"
             "else:\n    raise AssertionError('no ValueError')",
             "assert table == {(1, 2): b'ab', 'set': {3}}"]
    verdict = run_candidate(code, tests, LIMITS)
    assert verdict.correct, verdict.detail


def test_code_runs_the_candidate_unprivileged_and_apart_from_the_judge():
    import os

    from tokenmill.trainer.oracles import code

    report = code.sandbox_report()
    if os.geteuid() != 0:
        pytest.skip("not root: the candidate keeps this user (no other uid to drop to)")
    assert report["unprivilegedUser"] and report["judgeSeparated"], report
    verdict = run_candidate("import os\nids = (os.getuid(), os.getgid(), os.getppid())",
                            ["import os\nassert ids[0] == ids[1] == 65534, ids\n"
                             "assert os.getuid() == 65533 and ids[2] == os.getpid(), (ids, os.getuid())"], LIMITS)
    assert verdict.correct, verdict.detail


# ---- multiple choice --------------------------------------------------------------------------

CHOICES = ["London", "Paris", "Rome", "Berlin"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (B).", "B"),
        ("C looks tempting, but answer: d", "D"),
        (r"\boxed{A}", "A"),
        (r"\boxed{\text{(C)}}", "C"),
        ("Between (A) and (C), I pick (C)", "C"),
        ("It must be Paris.", "B"),
        ("the answer is (c)", "C"),
        ("ANSWER: B", "B"),
        ("the answer is a city on the Seine", None),
        ("no idea", None),
    ],
)
def test_multiple_choice_extraction(text, letter):
    assert extract_choice(text, CHOICES) == letter


def test_multiple_choice_by_letter_or_text():
    oracle = MultipleChoiceOracle()
    assert oracle.check({"answer": "B", "choices": CHOICES}, "The answer is (B)").correct
    assert oracle.check({"answer": "Paris", "choices": CHOICES}, "answer: B").correct
    assert oracle.check({"answer": "paris", "choices": CHOICES}, "It is Paris.").correct
    wrong = oracle.check({"answer": "Paris", "choices": CHOICES}, "The answer is (C)")
    assert (wrong.correct, wrong.reason, wrong.extracted) == (False, "wrong-answer", "C")
    assert oracle.check({"answer": "e"}, "answer is E").correct  # letters A-J without choices


# ---- bad input and crashes --------------------------------------------------------------------

def test_unknown_oracle_kind():
    with pytest.raises(OracleInputError, match="oracle.kind: unknown oracle 'regex'"):
        make_oracle("regex")


@pytest.mark.parametrize(
    ("kind", "problem", "message"),
    [
        ("math", {"prompt": "1+1?"}, r"problems\[p1\]\.answer: a math problem needs"),
        ("math", {"prompt": "1+1?", "answer": " "}, r"problems\[p1\]\.answer"),
        ("code", {"prompt": "add"}, r"problems\[p1\]\.tests: a code problem needs unit tests"),
        ("code", {"prompt": "add", "tests": ["assert add(1,"]}, r"tests\[0\]: not valid Python"),
        ("multiple-choice", {"prompt": "?", "answer": "Madrid", "choices": CHOICES}, "not one of the choices"),
    ],
)
def test_problems_that_cannot_be_checked(kind, problem, message):
    oracle = make_oracle(kind)
    good = {"math": {"answer": "2"}, "code": {"tests": "assert True"},
            "multiple-choice": {"answer": "A", "choices": CHOICES}}[kind]
    assert check_problems(oracle, [("p0", good)]) == 1
    with pytest.raises(OracleInputError, match=message):
        check_problems(oracle, [("p0", good), ("p1", problem)])


def test_a_crashing_oracle_is_a_failure_with_its_reason():
    class Exploding:
        kind = "math"

        def problem_error(self, problem):
            return None

        def check(self, problem, completion):
            raise RuntimeError("parser blew up")

    verdict = safe_check(Exploding(), {"answer": "1"}, "1")
    assert (verdict.correct, verdict.reason) == (False, ORACLE_CRASHED)
    assert "RuntimeError: parser blew up" in verdict.detail
