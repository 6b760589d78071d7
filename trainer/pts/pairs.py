"""The search's preference pairs, and their rows in the `preference_pairs` dataset (token form)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

SOURCE = "pts"


@dataclass(frozen=True)
class PivotalTokenPair:
    """A one-token pair at a pivotal token: the same prompt, one next token that raises p and
    one that lowers it, each with its estimated p and the rollouts behind that estimate."""

    kind: ClassVar[str] = "pivotal"

    problem_id: str
    solution_index: int
    position: int
    """Index of the pivotal token in its solution."""
    prompt_ids: tuple[int, ...]
    """The question and the solution's tokens before the pivotal one, as sampled."""
    chosen_id: int
    rejected_id: int
    p_prefix: float
    prefix_rollouts: int
    p_chosen: float
    chosen_rollouts: int
    p_rejected: float
    rejected_rollouts: int

    @property
    def id(self) -> str:
        return f"{self.problem_id}/s{self.solution_index}/t{self.position}"

    def to_row(self) -> dict[str, Any]:
        meta = {
            "kind": self.kind,
            "problem_id": self.problem_id,
            "solution_index": self.solution_index,
            "position": self.position,
            "p_before": self.p_prefix,
            "rollouts": self.prefix_rollouts,
            "p_chosen": self.p_chosen,
            "chosen_rollouts": self.chosen_rollouts,
            "p_rejected": self.p_rejected,
            "rejected_rollouts": self.rejected_rollouts,
        }
        return {
            "id": self.id,
            "prompt_tokens": list(self.prompt_ids),
            "chosen_tokens": [self.chosen_id],
            "rejected_tokens": [self.rejected_id],
            "source": SOURCE,
            "meta": json.dumps(meta, sort_keys=True),
        }


@dataclass(frozen=True)
class FullSolutionPair:
    """A correct against an incorrect complete solution of the same question (for comparison)."""

    kind: ClassVar[str] = "full-solution"

    problem_id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    index: int = 0

    @property
    def id(self) -> str:
        return f"{self.problem_id}/full{self.index}"

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt_tokens": list(self.prompt_ids),
            "chosen_tokens": list(self.chosen_ids),
            "rejected_tokens": list(self.rejected_ids),
            "source": SOURCE,
            "meta": json.dumps({"kind": self.kind, "problem_id": self.problem_id}, sort_keys=True),
        }
