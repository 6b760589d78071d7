"""Runs inside the code oracle's sandbox: applies the limits, then the candidate and its tests.

Started by `code.run_candidate` as a script (never imported by the workload):
`python -I sandbox_runner.py LIMITS_JSON` in a fresh temporary directory holding
`solution.py` and `tests.json`; the run's nonce arrives on stdin. The result is written to
`result.json` only after every test passed, so a candidate that exits early does not pass.
"""

import json
import os
import resource
import signal
import sys
import types

EXIT_PASSED = 0
EXIT_TEST_FAILED = 10
EXIT_ERROR = 11
EXIT_MEMORY = 12


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def main() -> int:
    limits = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    with open("solution.py", encoding="utf-8") as handle:
        solution = handle.read()
    with open("tests.json", encoding="utf-8") as handle:
        tests = json.load(handle)

    # Python ignores SIGXFSZ; restoring the default makes an oversized output kill the run.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_FSIZE, limits["output_bytes"])
    _limit(resource.RLIMIT_CPU, limits["cpu_seconds"])
    if limits.get("drop_to_uid") is not None:
        _limit(resource.RLIMIT_NPROC, 64)
        os.setgroups([])
        os.setgid(limits["drop_to_uid"])
        os.setuid(limits["drop_to_uid"])
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])

    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    try:
        exec(compile(solution, "solution.py", "exec"), module.__dict__)
    except MemoryError:
        print("MemoryError in the solution", file=sys.stderr)
        return EXIT_MEMORY
    except BaseException as error:  # noqa: BLE001 - any failure of the candidate is its verdict
        print(f"the solution raised {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"test[{index}]", "exec"), module.__dict__)
        except MemoryError:
            print(f"MemoryError in test[{index}]", file=sys.stderr)
            return EXIT_MEMORY
        except BaseException as error:  # noqa: BLE001
            print(f"test[{index}] failed: {type(error).__name__}: {error}", file=sys.stderr)
            return EXIT_TEST_FAILED
    with open("result.json", "w", encoding="utf-8") as handle:
        json.dump({"nonce": nonce, "passed": len(tests)}, handle)
    return EXIT_PASSED


if __name__ == "__main__":
    sys.exit(main())
