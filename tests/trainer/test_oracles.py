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


def test_code_timeout_kills_the_process_group(tmp_path):
    tmp_path.chmod(0o777)  # the candidate may run as an unprivileged user
    pid_file = tmp_path / "grandchild.pid"
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
