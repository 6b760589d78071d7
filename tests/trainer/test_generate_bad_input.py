"""Engines from specs: bad input fails before any generation, naming the field; checkpoints load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.trainer.generate_fixtures import export_tiny
from tokenmill.api.synthetic import Generator
from tokenmill.model_configs import get_model_config
from tokenmill.store import CheckpointStore
from tokenmill.trainer.generate import GenerationInputError, GenerationRequest, SamplingParams, TorchEngine
from tokenmill.trainer.generate.factory import build_engine, engine_from_generator, sampling_from_spec
from tokenmill.trainer.model import build_model
from tokenmill.trainer.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("tiny-gen"))


def test_unknown_engine_missing_or_bad_model():
    with pytest.raises(GenerationInputError, match=r"generator\.engine: unknown engine 'gpt'.*openai, torch, vllm"):
        build_engine("gpt")
    with pytest.raises(GenerationInputError, match=r"generator\.model: engine torch needs a model"):
        engine_from_generator({"engine": "torch"}, output=None)
    with pytest.raises(GenerationInputError, match=r"generator: engine openai needs endpoint and modelName"):
        build_engine("openai", endpoint="http://127.0.0.1:1/v1")


def test_not_a_model_and_vocabulary_mismatch(export_dir, tmp_path):
    with pytest.raises(GenerationInputError, match=r"generator\.model: .*neither a committed checkpoint"):
        build_engine("torch", model_uri=f"file://{tmp_path}")
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for path in export_dir.iterdir():
        (mismatched / path.name).write_bytes(path.read_bytes())
    config = json.loads((mismatched / "config.json").read_text())
    config["tokenmill"]["tokenizer"] = "phi-4"
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(GenerationInputError, match=r"tokenizer 'phi-4' has 100352 ids but the model only 320.*mismatch"):
        build_engine("torch", model_uri=f"file://{mismatched}", device="cpu")


def test_a_generator_spec_builds_a_cached_torch_engine(export_dir, tmp_path):
    spec = Generator.model_validate({"engine": "torch", "model": {"uri": f"file://{export_dir}"},
                                     "sampling": {"temperature": 0.0, "maxTokens": 8, "seed": 3}})
    engine = engine_from_generator(spec, output=f"file://{tmp_path}/job", device="cpu")
    sampling = sampling_from_spec(spec.sampling)
    assert (sampling.temperature, sampling.max_tokens, sampling.seed) == (0.0, 8, 3)
    (output,) = engine.generate([GenerationRequest(messages=({"role": "user", "content": "Hi"},), sampling=sampling)])
    assert output.completions[0].completion_tokens >= 1
    with pytest.raises(GenerationInputError, match=r"requests\[0\]\.sampling\.maxTokens"):
        engine.generate([GenerationRequest(prompt_token_ids=(1,), sampling=SamplingParams(max_tokens=200_000))])
    engine.close()


def test_a_committed_checkpoint_loads_and_generates_like_the_model(tmp_path):
    config = get_model_config("tiny")
    model = build_model(config, seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    checkpoints = CheckpointStore(f"file://{tmp_path}/stage/checkpoints")
    state = {"step": 5, "model": {"config": "tiny", "rope_theta": 10_000.0, "max_positions": 256, "tokenizer": "byte"}}
    with checkpoints.staging(5, state) as directory:
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(directory))
    uri = f"file://{tmp_path}/stage/checkpoints/step-00000005"
    loaded = build_engine("torch", model_uri=uri, device="cpu")
    assert loaded.model_identity.startswith("checkpoint:")
    request = GenerationRequest(prompt_token_ids=tuple(BYTE.encode("Hello")), sampling=SamplingParams(temperature=0, max_tokens=16))
    expected = TorchEngine(model, BYTE).generate([request])[0].completions[0].token_ids
    assert loaded.generate([request])[0].completions[0].token_ids == expected
