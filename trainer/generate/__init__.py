"""Generation engines behind one interface (`interface.Engine`): torch, openai and vllm.

Import the engines lazily: `tokenmill.trainer.generate` itself needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenmill.trainer.generate.interface import (
    Completion,
    Engine,
    GenerationError,
    GenerationInputError,
    GenerationRequest,
    RequestOutput,
    SampleFailure,
    SamplingParams,
    TopLogprob,
    sample_seed,
)

if TYPE_CHECKING:
    from tokenmill.trainer.generate.torch_engine import TorchEngine

_LAZY = {
    "TorchEngine": "tokenmill.trainer.generate.torch_engine",
    "PrefixCache": "tokenmill.trainer.generate.torch_engine",
    "load_torch_engine": "tokenmill.trainer.generate.loading",
    "load_model": "tokenmill.trainer.generate.loading",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [
    "Completion",
    "Engine",
    "GenerationError",
    "GenerationInputError",
    "GenerationRequest",
    "PrefixCache",
    "RequestOutput",
    "SampleFailure",
    "SamplingParams",
    "TopLogprob",
    "TorchEngine",
    "load_model",
    "load_torch_engine",
    "sample_seed",
]
