"""The synthetic-data README's example of adding a dataset type works as written: its template
and its config entry, taken from the page, make a type the workflow runs."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from tokenmill.trainer.generate import SamplingParams
from tokenmill.trainer.generate.scripted_engine import ScriptedEngine, correct_answer
from tokenmill.trainer.synth import templates, workflow
from tokenmill.trainer.synth.steps import AgreementFilter, Context, InstructionReversal, SelfRevision

README = Path(workflow.__file__).with_name("README.md")


def example_blocks() -> tuple[str, str, str]:
    """The section's template file name, template and Python entry."""
    section = README.read_text(encoding="utf-8").split("## Adding a dataset type", 1)[1].split("\n## ", 1)[0]
    name = re.search(r"`templates/(\w+)\.j2`", section).group(1)
    jinja = re.search(r"```jinja\n(.*?)```", section, re.DOTALL).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    return name, textwrap.dedent(jinja), textwrap.dedent(python)


class RecordingTeacher(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(mistake_rate=0.3)
        self.prompts: list[str] = []

    def respond(self, prompt, rng):
        self.prompts.append(prompt)
        return super().respond(prompt, rng)


@pytest.fixture
def documented_type(tmp_path, monkeypatch):
    """The README's template in a copy of the template folder, its entry in a copy of DATASET_TYPES."""
    name, jinja, python = example_blocks()
    copied = tmp_path / "templates"
    shutil.copytree(templates.TEMPLATE_DIR, copied)
    (copied / f"{name}.j2").write_text(jinja, encoding="utf-8")
    monkeypatch.setattr(templates, "TEMPLATE_DIR", copied)
    templates.get.cache_clear()
    templates._environment.cache_clear()
    monkeypatch.setattr(workflow, "DATASET_TYPES", dict(workflow.DATASET_TYPES))
    added = set(workflow.DATASET_TYPES)
    exec(compile(python, str(README), "exec"), workflow.__dict__)  # noqa: S102 - the page's own example
    [kind] = set(workflow.DATASET_TYPES) - added
    yield workflow.dataset_type(kind), name
    templates.get.cache_clear()
    templates._environment.cache_clear()


def test_the_documented_dataset_type_drafts_with_its_template_and_writes_checked_records(documented_type) -> None:
    kind, draft = documented_type
    assert kind.draft == draft
    seeds = [{"id": f"q{i}", "question": q, "source": "docs", "answer": None, "tests": None, "meta": {}}
             for i, q in enumerate(["What is 17 + 25?", "Compute 3 * (4 + 5) - 2.", "Compute 12 * 7 + 5 * 3 - 9.",
                                    "Lena has 40 stickers and gives away 13. How many are left?"])]
    steps = [AgreementFilter(6, 0.2, 1.0), SelfRevision(2, ["reasoning", "factual accuracy"])]
    workflow.check_workflow(kind, steps)
    workflow.check_templates(steps, seeds, "spec.seeds", draft=kind.draft)
    teacher = RecordingTeacher()
    rows, stats = workflow.Workflow(kind, steps, [{"type": "agreementFilter"}, {"type": "selfRevision"}]).run(
        seeds, Context(teacher, SamplingParams(seed=0, max_tokens=256)))
    assert rows and len(rows) == stats.written
    for row in rows:
        meta = json.loads(row["meta"])
        assert meta["answer"] == correct_answer(row["messages"][0]["content"])
        assert meta["provenance"]["datasetType"] == kind.name
        assert meta["provenance"]["templates"] == {"critique": 1, draft: 1, "revise": 1}
    drafting = [p for p in teacher.prompts if p.startswith("Task: solve")]
    assert drafting and all("ten-year-old" in p for p in drafting)  # the type's template, never solve.j2


def test_the_documented_dataset_type_refuses_steps_that_do_not_fit_it(documented_type) -> None:
    kind, _ = documented_type
    with pytest.raises(workflow.SynthInputError, match=rf"instructionReversal does not fit datasetType {kind.name}"):
        workflow.check_workflow(kind, [InstructionReversal(0.8, "char-ngram")])


def test_a_dataset_types_template_naming_a_missing_field_is_refused_before_generation(documented_type, monkeypatch):
    kind, draft = documented_type
    path = templates.TEMPLATE_DIR / f"{draft}.j2"
    path.write_text(path.read_text() + "Grade: {{ seed.grade }}\n")
    templates.get.cache_clear()
    seeds = [{"id": "q0", "question": "What is 1 + 1?", "source": "", "answer": None, "tests": None, "meta": {}}]
    with pytest.raises(workflow.SynthInputError, match=rf"seed q0.*{draft}\.j2 .*'grade'"):
        workflow.check_templates([SelfRevision(1, ["reasoning"])], seeds, "spec.seeds", draft=kind.draft)
