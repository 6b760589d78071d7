"""The pydantic base every API type derives from: camelCase on the wire, strict about unknown fields."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from tokenmill.api import cel


def _add_cel_rules(schema: dict[str, Any], model: type) -> None:
    rules = getattr(model, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [dict(rule) for rule in rules]


class ApiModel(BaseModel):
    """An object of the tokenmill API.

    `cel_rules` lists CEL `x-kubernetes-validations` for the CRD; the same rules are
    checked in Python by the model's validators so local runs and the API server agree.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        allow_inf_nan=False,
        frozen=False,
        use_attribute_docstrings=True,
        validate_default=True,
        json_schema_extra=_add_cel_rules,
    )

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML and in the Kubernetes API."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    @model_validator(mode="after")
    def _check_cel_rules(self) -> "ApiModel":
        broken = cel.failed_messages(type(self).cel_rules, self.to_wire())
        if broken:
            raise ValueError("; ".join(broken))
        return self
