"""The dashboard test runs the operator as the operator tests do: their fixtures, here too."""

from tests.operator.conftest import kube, recorded_calls, standin, start_operator, store_root  # noqa: F401
