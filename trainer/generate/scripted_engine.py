"""The `scripted` engine: a rule-based stand-in for a large teacher, for offline demos and tests.

It is not a model. It reads the task a prompt names (its first line, `Task: <name>`) and the
prompt's `### <Section>` blocks, and answers the way a teacher would on arithmetic and simple
word problems:

- `solve`: a worked solution, one line per operation, ending `The answer is \\boxed{X}.`; at
  `mistake_rate` one step's result is off by a little (and the error carries on to the end);
- `critique`: a score out of 5 per rubric criterion (`<criterion>: <n>/5 - <why>`), failing
  `reasoning` and `factual accuracy` exactly when the draft's final answer is wrong;
- `revise`: a fresh worked solution (it can slip again, at the same rate, on its own stream);
- `pose`: an arithmetic problem (`arithmetic_problems` pairs them with worked solutions);
- `rewrite`: the passage's problem restated as an exercise, discussion or structured task;
- `extract-qa`: question-answer pairs from the passage's reasoning chain, one per operation
  and one for the whole problem (`Q: ...` / `A: ...`; an operation's result slips at
  `mistake_rate`); a passage without arithmetic gets prose and no pairs;
- `instruct` / `implement`: the instruction a Python snippet answers, and the snippet back
  (dropping a line at `mistake_rate`), for instruction reversal;
- `follow-up`: the next user turn of a conversation about a number;
- `score`: a passage's educational value and reasoning (out of 5) and its complexity;
- `judge`: a score for a worked solution (`Score: <n>/<scale>`) from checking its arithmetic:
  full marks when every step holds and the final answer is the last step's result, less for
  each step that does not hold, the least for a response without steps or a final answer;
- `tests`: assert-lines for a Python function it can read.

Each sample draws its slips from its own stream (the prompt and `sample_seed(seed, index)`), so answers are reproducible and the request cache applies as for
any engine. Tokens are the text's words and punctuation marks (ids are their CRC32 modulo
50,000): good enough for token budgets, not a real tokenizer. `latency_s` waits that long per
request (benchmarks). Never the default engine: the spec must say `engine: scripted`.
"""

from __future__ import annotations

import ast
import operator
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction

from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationRequest,
    RequestOutput,
    sample_seed,
    stable_hash,
)

VERSION = "1"
_SECTION = re.compile(r"^###\s*(.+?)\s*$", re.MULTILINE)
_TASK = re.compile(r"^\s*Task:\s*([\w-]+)", re.MULTILINE)
_PIECE = re.compile(r"\w+|[^\w\s]")
_EXPRESSION = re.compile(r"[-(]*\s*\d+(?:\.\d+)?(?:\s*[-+*/×÷]\s*[(]*\s*\d+(?:\.\d+)?\s*[)]*)+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_APPLY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
# Word problems: a verb phrase names the operation between the first two numbers.
_WORDS = (
    (re.compile(r"\b(buys|gets|finds|receives|add|adds|more|gains|joins|plus)\b", re.I), "+"),
    (re.compile(r"\b(gives away|eats|loses|sells|spends|fewer|leave|leaves|minus|takes away)\b", re.I), "-"),
    (re.compile(r"\b(each|times|groups of|rows of|boxes of|bags of)\b", re.I), "*"),
    (re.compile(r"\b(shares|splits|divides|equally|among|per)\b", re.I), "/"),
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def sections(prompt: str) -> dict[str, str]:
    """The prompt's `### Name` blocks by lower-case name."""
    found: dict[str, str] = {}
    marks = list(_SECTION.finditer(prompt))
    for mark, following in zip(marks, [*marks[1:], None]):
        end = following.start() if following is not None else len(prompt)
        found[mark.group(1).strip().lower()] = prompt[mark.end():end].strip()
    return found


def format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def expression_of(problem: str) -> str | None:
    """The arithmetic the problem asks for: a written expression, else a word problem's."""
    written = [m.group(0).strip() for m in _EXPRESSION.finditer(problem.replace("×", "*").replace("÷", "/"))]
    if written:
        return max(written, key=len)
    numbers = _NUMBER.findall(problem)
    if len(numbers) >= 2:
        for pattern, symbol in _WORDS:
            if pattern.search(problem):
                return f"{numbers[0]} {symbol} {numbers[1]}"
    return None


def solve_steps(expression: str, slip_at: int | None = None,
                slip: int = 0) -> tuple[list[tuple[Fraction, str, Fraction, Fraction]], Fraction]:
    """The operations of `expression` in evaluation order, (left, symbol, right, result) each;
    operation number `slip_at` is off by `slip`, and later operations use its wrong result."""
    tree = ast.parse(expression, mode="eval").body
    steps: list[tuple[Fraction, str, Fraction, Fraction]] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _APPLY:
            left, right = value(node.left), value(node.right)
            result = _APPLY[type(node.op)](left, right)
            if len(steps) == slip_at:
                result += slip
            steps.append((left, _SYMBOLS[type(node.op)], right, result))
            return result
        raise ValueError("not arithmetic")

    return steps, value(tree)


def correct_answer(problem: str) -> str | None:
    """The true final answer the scripted teacher computes (None: not a problem it reads)."""
    expression = expression_of(problem)
    if expression is None:
        return None
    try:
        return format_number(solve_steps(expression)[1])
    except (ValueError, SyntaxError, ZeroDivisionError):
        return None


def _worked_steps(text: str, rng: random.Random, mistake_rate: float) -> tuple[list, float] | None:
    """The operations of the text's arithmetic, worked in order (with probability `mistake_rate`
    one slips), and the final result; None when the text states no calculation."""
    expression = expression_of(text)
    try:
        count = len(solve_steps(expression)[0]) if expression else 0
    except (ValueError, SyntaxError, ZeroDivisionError):
        count = 0
    if not count:
        return None
    slip_at = rng.randrange(count) if rng.random() < mistake_rate else None
    return solve_steps(expression, slip_at, rng.choice((-3, -2, -1, 1, 2, 3)))  # type: ignore[arg-type]


def _step_lines(steps: list) -> str:
    return "\n".join(f"Step {number + 1}: {format_number(left)} {symbol} {format_number(right)} = "
                     f"{format_number(result)}." for number, (left, symbol, right, result) in enumerate(steps))


def worked_solution(problem: str, rng: random.Random, mistake_rate: float) -> str:
    """A solution with one line per operation; with probability `mistake_rate` one slips."""
    worked = _worked_steps(problem, rng, mistake_rate)
    if worked is None:
        return "I cannot tell which calculation this problem asks for."
    steps, final = worked
    return f"{_step_lines(steps)}\nThe answer is \\boxed{{{format_number(final)}}}."


def _boxed(text: str) -> str | None:
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def critique(problem: str, draft: str, rubric: Sequence[str]) -> str:
    truth, given = correct_answer(problem), _boxed(draft)
    wrong = truth is None or given is None or given.replace(" ", "") != truth
    lines = []
    for criterion in rubric:
        name = criterion.strip()
        if wrong and name.lower() in ("reasoning", "factual accuracy", "correctness"):
            why = ("no final answer" if given is None else f"the final answer {given} is wrong; "
                   "a step's arithmetic does not hold")
            lines.append(f"{name}: 2/5 - {why}")
        else:
            lines.append(f"{name}: 5/5 - sound")
    return "\n".join(lines)


def pose(rng: random.Random) -> str:
    kind = rng.randrange(3)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    if kind == 0:
        return f"What is {a} + {b}?"
    if kind == 1:
        return f"Compute {a} * {c} - {b}."
    return f"A shop has {a} boxes of {c} pencils each. How many pencils are there?"


def rewrite(passage: str, target: str) -> str:
    problem = passage.strip().splitlines()[0] if passage.strip() else passage
    if target == "discussion":
        return f"Discuss how to approach this problem and why each step is needed: {problem}"
    if target == "structured-reasoning":
        return f"Break the problem into named steps, then solve it: {problem}"
    return f"Exercise: {problem}"


def extract_qa(passage: str, rng: random.Random, mistake_rate: float) -> str:
    """One question-answer pair per operation of the passage's arithmetic, in the order it is
    worked, then the passage's own question with its worked solution."""
    worked = _worked_steps(passage, rng, mistake_rate)
    if worked is None:
        return "The passage states no calculation, so there is no reasoning chain to ask about."
    steps, final = worked
    pairs = []
    for left, symbol, right, result in steps:
        operation = f"{format_number(left)} {symbol} {format_number(right)}"
        pairs.append(f"Q: What is {operation}?\nA: {operation} = {format_number(result)}.\n"
                     f"The answer is \\boxed{{{format_number(result)}}}.")
    question = passage.strip().splitlines()[0]
    pairs.append(f"Q: {question}\nA: {_step_lines(steps)}\nThe answer is \\boxed{{{format_number(final)}}}.")
    return "\n\n".join(pairs)


def _function_name(code: str) -> str | None:
    found = re.search(r"def\s+(\w+)\s*\(([^)]*)\)", code)
    return found.group(1) if found else None


def instruct(code: str) -> str:
    name = _function_name(code) or "solution"
    body = "\n".join(f"    {line}" for line in code.strip().splitlines())
    return f"Write a Python function `{name}` equivalent to this outline:\n{body}"


def implement(instruction: str, rng: random.Random, mistake_rate: float) -> str:
    lines = [line[4:] if line.startswith("    ") else line for line in instruction.splitlines()[1:]]
    if len(lines) > 1 and rng.random() < mistake_rate:
        del lines[rng.randrange(1, len(lines))]
    return "```python\n" + "\n".join(lines) + "\n```"


def tests_for(code: str) -> str:
    name = _function_name(code)
    if name is None:
        return "```python\nassert False, 'no function to test'\n```"
    return f"```python\nassert callable({name})\n```"


def follow_up(conversation: str, rng: random.Random) -> str:
    answer = _boxed(conversation) or "0"
    return f"Now add {rng.randint(2, 20)} to {answer}. What do you get?"


def score_passage(passage: str) -> str:
    """Educational value from the quantities a passage gives, reasoning from the operations it
    needs, complexity from both."""
    quantities = len(_NUMBER.findall(passage))
    expression = expression_of(passage)
    try:
        operations = len(solve_steps(expression)[0]) if expression else 0
    except (ValueError, SyntaxError, ZeroDivisionError):
        operations = 0
    value, reasoning = min(5, 1 + quantities), min(5, 1 + operations)
    complexity = "high" if operations >= 3 else "medium" if operations else "low"
    return f"educational value: {value}/5\nreasoning: {reasoning}/5\ncomplexity: {complexity}"


_STEP_LINE = re.compile(r"=\s*(-?\d+(?:\.\d+)?(?:/\d+)?)\s*\.?\s*$")


def judge(response: str, scale: int) -> str:
    """The response's steps (`<expression> = <result>` lines) checked one by one."""
    held, results = 0, []
    for line in response.splitlines():
        found = _STEP_LINE.search(line)
        expression = expression_of(line[:found.start()]) if found else None
        if found is None or expression is None:
            continue
        try:
            truth = solve_steps(expression)[1]
        except (ValueError, SyntaxError, ZeroDivisionError):
            continue
        results.append(found.group(1))
        held += Fraction(found.group(1)) == truth
    final = _boxed(response)
    if not results or final is None:
        return f"The response shows no checkable steps or no final answer.\nScore: 0/{scale}"
    if held == len(results) and final.replace(" ", "") == results[-1]:
        return f"All {held} steps hold and the final answer follows.\nScore: {scale}/{scale}"
    quality = Fraction(1, 5) + Fraction(1, 2) * Fraction(held, len(results))
    return (f"{held} of {len(results)} steps hold; the final answer {final} is not sound.\n"
            f"Score: {int(quality * scale)}/{scale}")


class ScriptedEngine(Engine):
    """A stand-in teacher (see the module's description); thread-safe, stateless between calls
    apart from `answered` (samples it produced, for tests and benchmarks)."""

    engine_name = "scripted"

    def __init__(self, mistake_rate: float = 0.2, latency_s: float = 0.0) -> None:
        if not 0.0 <= mistake_rate <= 1.0:
            raise ValueError(f"mistake_rate must lie in [0, 1], got {mistake_rate}")
        self.mistake_rate = mistake_rate
        self.latency_s = latency_s
        self.answered = 0
        self._lock = threading.Lock()

    @property
    def model_identity(self) -> str:
        return f"scripted-teacher/{VERSION}/mistake-rate={self.mistake_rate:g}"

    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            if self.latency_s:
                time.sleep(self.latency_s)
            output = RequestOutput(request)
            prompt = _prompt_text(request)
            for index in request.indices:
                text = self.respond(prompt, _rng(request, prompt, index))
                output.completions.append(_completion(index, text, prompt, request.sampling.max_tokens))
            with self._lock:
                self.answered += len(request.indices)
            outputs.append(output)
        return outputs

    def respond(self, prompt: str, rng: random.Random) -> str:
        """The answer to one prompt (the last user turn) with the slips `rng` decides."""
        task_match = _TASK.search(prompt)
        task = task_match.group(1).lower() if task_match else ""
        parts = sections(prompt)
        problem = parts.get("problem", "")
        if task == "solve":
            return worked_solution(problem, rng, self.mistake_rate)
        if task == "critique":
            rubric = [line.lstrip("-* ").strip() for line in parts.get("rubric", "").splitlines() if line.strip()]
            return critique(problem, parts.get("draft", ""), rubric or ["reasoning"])
        if task == "revise":
            return worked_solution(problem, rng, self.mistake_rate)
        if task == "pose":
            return pose(rng)
        if task == "rewrite":
            return rewrite(parts.get("passage", ""), parts.get("target", "exercise"))
        if task == "extract-qa":
            return extract_qa(parts.get("passage", ""), rng, self.mistake_rate)
        if task == "instruct":
            return instruct(_strip_fence(parts.get("code", "")))
        if task == "implement":
            return implement(parts.get("instruction", ""), rng, self.mistake_rate)
        if task == "tests":
            return tests_for(_strip_fence(parts.get("code", "")))
        if task == "follow-up":
            return follow_up(parts.get("conversation", ""), rng)
        if task == "score":
            return score_passage(parts.get("passage", ""))
        if task == "judge":
            scale = parts.get("scale", "10")
            return judge(parts.get("response", ""), int(scale) if scale.isdigit() and int(scale) > 0 else 10)
        return ""  # a task it does not know: an empty answer (the caller drops and counts it)


def _strip_fence(text: str) -> str:
    fenced = re.search(r"```[\w]*\n(.*?)```", text, re.DOTALL)
    return fenced.group(1) if fenced else text


def _prompt_text(request: GenerationRequest) -> str:
    if request.messages:
        users = [m["content"] for m in request.messages if m["role"] == "user"]
        return users[-1] if users else request.messages[-1]["content"]
    return " ".join(str(t) for t in request.prompt_token_ids or ())


def _rng(request: GenerationRequest, prompt: str, index: int) -> random.Random:
    """The sample's own stream: its seed (or its index, unseeded) and the prompt, so different
    questions slip at different samples."""
    return random.Random(stable_hash({"prompt": prompt, "sample": sample_seed(request.sampling.seed, index),
                                      "index": index}))


def pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def _completion(index: int, text: str, prompt: str, max_tokens: int) -> Completion:
    words = pieces(text)
    finish = "stop"
    if len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
        text = _cut(text, max_tokens)
    ids = [zlib.crc32(w.encode()) % 50_000 for w in words]
    return Completion(index=index, token_ids=ids, text=text, finish_reason=finish,  # type: ignore[arg-type]
                      prompt_tokens=len(pieces(prompt)))


def _cut(text: str, count: int) -> str:
    matches = list(_PIECE.finditer(text))
    return text[:matches[count - 1].end()] if count and matches else ""


def arithmetic_problems(engine: Engine, count: int, *, seed: int = 0, batch: int = 64) -> Iterator[dict[str, str]]:
    """A stream of arithmetic problems with worked solutions and their true answers, asked of
    `engine` (a scripted teacher, through the request cache when it is a `CachedEngine`):
    `{"id", "problem", "solution", "answer"}` each. The solution can hold a slip (at the
    engine's mistake rate); `answer` is always the true one."""
    from tokenmill.trainer.generate.interface import SamplingParams

    for start in range(0, count, batch):
        numbers = range(start, min(count, start + batch))
        posed = engine.generate([
            GenerationRequest(messages=({"role": "user", "content": "Task: pose\nWrite one arithmetic problem."},),
                              sampling=SamplingParams(seed=seed * 1_000_003 + number, max_tokens=64))
            for number in numbers])
        problems = [output.completions[0].text if output.completions else "" for output in posed]
        solved = engine.generate([
            GenerationRequest(messages=({"role": "user", "content": f"Task: solve\n### Problem\n{problem}"},),
                              sampling=SamplingParams(seed=seed, max_tokens=512))
            for problem in problems])
        for number, problem, output in zip(numbers, problems, solved):
            if not output.completions or not problem:
                continue
            answer = correct_answer(problem)
            if answer is None:
                continue
            yield {"id": f"arith-{seed}-{number}", "problem": problem,
                   "solution": output.completions[0].text, "answer": answer}
