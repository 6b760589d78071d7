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
    from tokenmill.trainer.generate.cache import (
        CachedEngine,
        FailureBudget,
        GenerationBudgetExceeded,
        RequestCache,
        generations_uri,
    )
    from tokenmill.trainer.generate.factory import build_engine, engine_from_generator, sampling_from_spec
    from tokenmill.trainer.generate.loading import load_model, load_torch_engine
    from tokenmill.trainer.generate.openai_engine import OpenAIEngine
    from tokenmill.trainer.generate.torch_engine import PrefixCache, TorchEngine, prompt_ids
    from tokenmill.trainer.generate.scripted_engine import ScriptedEngine
    from tokenmill.trainer.generate.vllm_engine import VLLMEngine

_LAZY = {
    "CachedEngine": "tokenmill.trainer.generate.cache",
    "FailureBudget": "tokenmill.trainer.generate.cache",
    "GenerationBudgetExceeded": "tokenmill.trainer.generate.cache",
    "RequestCache": "tokenmill.trainer.generate.cache",
    "generations_uri": "tokenmill.trainer.generate.cache",
    "build_engine": "tokenmill.trainer.generate.factory",
    "engine_from_generator": "tokenmill.trainer.generate.factory",
    "sampling_from_spec": "tokenmill.trainer.generate.factory",
    "OpenAIEngine": "tokenmill.trainer.generate.openai_engine",
    "VLLMEngine": "tokenmill.trainer.generate.vllm_engine",
    "ScriptedEngine": "tokenmill.trainer.generate.scripted_engine",
    "prompt_ids": "tokenmill.trainer.generate.torch_engine",
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
    "CachedEngine",
    "Completion",
    "Engine",
    "FailureBudget",
    "GenerationBudgetExceeded",
    "GenerationError",
    "GenerationInputError",
    "GenerationRequest",
    "OpenAIEngine",
    "PrefixCache",
    "RequestCache",
    "RequestOutput",
    "SampleFailure",
    "SamplingParams",
    "ScriptedEngine",
    "TopLogprob",
    "TorchEngine",
    "VLLMEngine",
    "build_engine",
    "engine_from_generator",
    "generations_uri",
    "load_model",
    "load_torch_engine",
    "prompt_ids",
    "sample_seed",
    "sampling_from_spec",
]
