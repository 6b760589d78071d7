"""The Hugging Face `Phi3ForCausalLM` mapping: export, import, and generation."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill.model_configs import ModelConfig, get_model_config
from tokenmill.trainer.model import build_model
from tokenmill.trainer.model.hf import (
    config_from_hf,
    export_hf,
    from_hf_state_dict,
    hf_config,
    load_hf,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

# GQA 2:1 and a non-default RoPE base, so a wrong split or base would show in the logits.
CONFIG = ModelConfig(
    name="test-hf", vocab_size=320, hidden_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, intermediate_size=96, max_position_embeddings=128, rope_theta=10_000.0,
    tokenizer="byte",
)


def _ids(batch: int = 2, seq_len: int = 40) -> torch.Tensor:
    return torch.randint(0, 320, (batch, seq_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, rope_theta=50_000.0, max_positions=256, seed=0).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_hf(model, CONFIG, tmp_path_factory.mktemp("fp32"), dtype="float32")


def test_fused_layout_and_round_trip(model):
    ours = model.state_dict()
    hf = to_hf_state_dict(ours, CONFIG)
    qkv = hf["model.layers.1.self_attn.qkv_proj.weight"]
    assert qkv.shape == (64 + 2 * 32, 64)
    assert torch.equal(qkv[:64], ours["layers.1.attention.q_proj.weight"])
    assert torch.equal(qkv[64:96], ours["layers.1.attention.k_proj.weight"])
    assert torch.equal(qkv[96:], ours["layers.1.attention.v_proj.weight"])
    gate_up = hf["model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(gate_up[:96], ours["layers.0.mlp.gate_proj.weight"])
    assert torch.equal(gate_up[96:], ours["layers.0.mlp.up_proj.weight"])
    back = from_hf_state_dict(hf, CONFIG)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[name], ours[name]) for name in ours)


def test_mapping_rejects_wrong_keys_and_strips_wrappers(model):
    state = dict(model.state_dict())
    del state["norm.weight"]
    with pytest.raises(KeyError, match="missing \\['norm.weight'\\]"):
        to_hf_state_dict(state, CONFIG)
    compiled = {f"_orig_mod.{name}": t for name, t in model.state_dict().items()}
    assert to_hf_state_dict(compiled, CONFIG).keys() == to_hf_state_dict(state | {
        "norm.weight": model.norm.weight}, CONFIG).keys()


def test_config_json(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["model_type"] == "phi3"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 50_000.0
    assert config["max_position_embeddings"] == 256
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        256, 261, 264
    )
    assert config["dtype"] == "float32" and not config["tie_word_embeddings"]
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [261, 256]
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {
        path.name for path in exported.iterdir()
    }


def test_transformers_loads_our_export_with_same_logits(model, exported):
    theirs = transformers.Phi3ForCausalLM.from_pretrained(exported).eval()
    assert theirs.config.rope_parameters["rope_theta"] == 50_000.0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_we_load_a_checkpoint_transformers_wrote(tmp_path):
    hf = transformers.Phi3Config(
        vocab_size=320, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=96,
        rope_parameters={"rope_type": "default", "rope_theta": 25_000.0},
        bos_token_id=256, eos_token_id=261, pad_token_id=264,
    )
    torch.manual_seed(0)
    theirs = transformers.Phi3ForCausalLM(hf).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                parameter.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path)
    state_dict, config = load_hf(tmp_path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (3, 8, 2)
    assert (config.rope_theta, config.max_position_embeddings, config.tokenizer) == (
        25_000.0, 96, "byte"
    )
    ours = build_model(config).eval()
    ours.load_state_dict(state_dict)
    ids = _ids(2, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_generate_on_our_export_matches_our_greedy_decoding(model, exported):
    theirs = transformers.Phi3ForCausalLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = tokenizer("Once upon", return_tensors="pt").input_ids
    generated = theirs.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert generated.shape == (1, prompt.shape[1] + 8)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_sharded_bf16_export_round_trips(model, tmp_path):
    export_hf(model, CONFIG, tmp_path, dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    state_dict, config = load_hf(tmp_path)
    assert config.rope_theta == 50_000.0 and config.max_position_embeddings == 256
    for name, tensor in model.state_dict().items():
        assert state_dict[name].dtype == torch.bfloat16
        torch.testing.assert_close(state_dict[name], tensor.to(torch.bfloat16), rtol=0, atol=0)
    theirs = transformers.Phi3ForCausalLM.from_pretrained(tmp_path)
    assert theirs.dtype == torch.bfloat16
    export_hf(model, CONFIG, tmp_path, dtype="float32")
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors*")) == ["model.safetensors"]


def test_phi4_vocab_export_has_phi4_tokenizer(tmp_path):
    config = get_model_config("tiny-phi4-vocab")
    model = build_model(config, rope_theta=250_000.0, max_positions=1024, seed=0)
    export_hf(model.state_dict(), config, tmp_path, rope_theta=250_000.0, max_positions=1024)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (
        100257, 100265, 100349
    )
    assert hf["rope_theta"] == 250_000.0 and hf["dtype"] == "bfloat16"
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenmill_tokenizer"] == "phi-4"
    assert tokenizer_config["pad_token"] == "<|dummy_85|>"
    assert tokenizer_config["model_max_length"] == 1024
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 100_256 and vocab["hello"] == 15339
    _, loaded = load_hf(tmp_path)
    assert loaded == config.__class__(**{**config.to_dict(), "max_position_embeddings": 1024,
                                          "rope_theta": 250_000.0})


def test_unsupported_phi3_configs_are_rejected():
    base = hf_config(CONFIG, dtype="float32")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        config_from_hf({**base, "tie_word_embeddings": True})
    longrope = {**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="rope type"):
        config_from_hf(longrope)
    with pytest.raises(ValueError, match="no tokenizer has a vocabulary of 32064"):
        config_from_hf({**base, "vocab_size": 32064, "tokenmill": None})
    with pytest.raises(ValueError, match="more than the model's vocabulary of 320"):
        hf_config(CONFIG, tokenizer_name="phi-4")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_hf({}, CONFIG, "unused", dtype="int8")
