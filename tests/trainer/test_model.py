"""The decoder: exact size, GQA shapes, RoPE base, causality, document masking, FLOPs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from tokenmill.model_configs import MODEL_CONFIGS, ModelConfig, get_model_config
from tokenmill.trainer.model import build_model, flops_per_token, matmul_parameters, mfu
from tokenmill.trainer.model.attention import document_boundaries, document_mask, plan_attention

TINY = get_model_config("tiny")
# A GQA 4:1 layout like Phi-4's, small enough for CPU tests.
SMALL = ModelConfig(
    name="test-small", vocab_size=320, hidden_size=64, num_layers=2, num_heads=4,
    num_kv_heads=1, intermediate_size=128, max_position_embeddings=64, rope_theta=10_000.0,
    tokenizer="byte",
)
ROOT = Path(__file__).resolve().parents[2]


def _ids(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (batch, seq_len), generator=generator)


@pytest.fixture(scope="module")
def small():
    return build_model(SMALL, seed=0).eval()


def test_phi4_parameter_count_on_meta():
    config = get_model_config("phi-4")
    model = build_model(config, device="meta")
    assert model.num_parameters() == 14_659_507_200 == config.parameter_count()
    assert all(p.is_meta for p in model.parameters())
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight is not model.embed.weight


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_config_builds_with_its_exact_count(name):
    config = MODEL_CONFIGS[name]
    assert build_model(config, device="meta").num_parameters() == config.parameter_count()


def test_gqa_projection_shapes():
    phi4 = build_model(get_model_config("phi-4"), device="meta")
    attention, mlp = phi4.layers[0].attention, phi4.layers[0].mlp
    assert attention.q_proj.weight.shape == (40 * 128, 5120)
    assert attention.k_proj.weight.shape == (10 * 128, 5120)
    assert attention.v_proj.weight.shape == (10 * 128, 5120)
    assert attention.o_proj.weight.shape == (5120, 40 * 128)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (17_920, 5120)
    assert mlp.down_proj.weight.shape == (5120, 17_920)
    assert phi4.lm_head.weight.shape == phi4.embed.weight.shape == (100_352, 5120)


def test_forward_shape_and_meta_logits():
    model = build_model(get_model_config("phi-4"), device="meta")
    logits = model(torch.zeros(2, 16, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 16, 100_352)


def test_rope_base_changes_outputs_after_position_zero(small):
    other = build_model(SMALL, rope_theta=250_000.0).eval()
    other.load_state_dict(small.state_dict())
    assert other.rope_theta == 250_000.0 and small.rope_theta == 10_000.0
    ids = _ids(1, 32)
    with torch.no_grad():
        base, changed = small(ids), other(ids)
    torch.testing.assert_close(base[:, 0], changed[:, 0])
    assert (base[:, 1:] - changed[:, 1:]).abs().amax(dim=-1).min() > 1e-6


def test_causal(small):
    ids = _ids(1, 24)
    perturbed = ids.clone()
    perturbed[0, 10] = (ids[0, 10] + 1) % 320
    with torch.no_grad():
        before, after = small(ids), small(perturbed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_documents_do_not_attend_across_boundaries(small):
    first, second = _ids(1, 12, seed=1), _ids(1, 20, seed=2)
    packed = torch.cat([first, second], dim=1)
    documents = torch.tensor([[0] * 12 + [1] * 20])
    other_first = _ids(1, 12, seed=3)
    with torch.no_grad():
        logits = small(packed, document_ids=documents)
        perturbed = small(torch.cat([other_first, second], dim=1), document_ids=documents)
        alone = small(second)
        unmasked = small(packed)
        restarted = torch.cat([torch.arange(12), torch.arange(20)])
        reset = small(packed, document_ids=documents, position_ids=restarted)
    torch.testing.assert_close(logits[:, 12:], perturbed[:, 12:], rtol=0, atol=0)
    torch.testing.assert_close(reset[:, 12:], alone, rtol=1e-5, atol=1e-5)
    # RoPE is relative: without restarting positions the document sees what it sees alone.
    torch.testing.assert_close(logits[:, 12:], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[:, :12], unmasked[:, :12])
    assert not torch.allclose(unmasked[:, 12:], alone, atol=1e-3)


def test_document_masking_blocks_gradients(small):
    ids = _ids(2, 16)
    documents = torch.tensor([[0] * 6 + [1] * 10, [5] * 16])
    embeddings = small.embed(ids).detach().requires_grad_(True)
    captured = {}

    def replace_embeddings(module, inputs, output):
        captured["x"] = embeddings
        return embeddings

    handle = small.embed.register_forward_hook(replace_embeddings)
    try:
        logits = small(ids, document_ids=documents)
    finally:
        handle.remove()
    logits[0, 6:].sum().backward()
    grad = captured["x"].grad
    assert grad[0, :6].abs().max() == 0
    assert grad[0, 6:].abs().sum(-1).min() > 0
    assert grad[1].abs().max() == 0


def test_attention_mask_equals_document_ids(small):
    ids = _ids(2, 16)
    documents = torch.tensor([[0] * 5 + [1] * 11, [3] * 8 + [4] * 8])
    with torch.no_grad():
        by_ids = small(ids, document_ids=documents)
        by_mask = small(ids, attention_mask=document_mask(documents))
    # Per-document causal attention (document ids on a CPU) against the dense mask: the same
    # attention up to the order of floating-point sums.
    torch.testing.assert_close(by_ids, by_mask, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="boolean"):
        small(ids, attention_mask=document_mask(documents).float())


def test_document_boundaries_and_mask():
    documents = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 7, 7]])
    cu_seqlens, longest = document_boundaries(documents)
    assert cu_seqlens.tolist() == [0, 2, 5, 8, 10] and cu_seqlens.dtype == torch.int32
    assert longest == 3
    mask = document_mask(torch.tensor([[2, 2, 3, 2]]))[0, 0]
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]


def test_cpu_attention_plans():
    cpu = torch.device("cpu")
    assert plan_attention(None, None, 8, cpu, torch.float32).kind == "causal"
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [2] * 8])
    segments = plan_attention(documents, None, 8, cpu, torch.bfloat16)
    assert segments.kind == "segments" and segments.mask is None and segments.lengths == [[3, 5], [8]]
    dense = plan_attention(documents, document_mask(documents), 8, cpu, torch.float32)
    assert dense.kind == "dense" and dense.mask.shape == (2, 1, 8, 8)


def test_attention_is_planned_for_the_autocast_dtype(small, monkeypatch):
    """Under autocast the embedding output is fp32; attention must be planned for bf16, which on a
    CUDA device selects the variable-length kernel instead of a dense S x S mask."""
    from tokenmill.trainer.model import transformer

    planned = []

    def recording_plan(*args, **kwargs):
        plan = plan_attention(*args, **kwargs)
        planned.append((args[4], plan.kind))
        return plan

    monkeypatch.setattr(transformer, "plan_attention", recording_plan)
    ids = _ids(1, 16)
    documents = torch.zeros_like(ids)
    documents[:, 8:] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small(ids, document_ids=documents)
    small(ids, document_ids=documents)
    assert [dtype for dtype, _ in planned] == [torch.bfloat16, torch.float32]
    assert [kind for _, kind in planned] == ["segments", "segments"]  # on a CPU: per-document SDPA
    cuda = torch.device("cuda", 0)
    on_gpu = plan_attention(documents, None, 16, cuda, planned[0][0])
    assert on_gpu.kind == "varlen" and on_gpu.mask is None and on_gpu.cu_seqlens.tolist() == [0, 8, 16]
    assert plan_attention(documents, None, 16, cuda, torch.float32).kind == "dense"


def test_sequence_longer_than_positions_fails():
    model = build_model(TINY)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        model(torch.zeros(1, 257, dtype=torch.long))
    longer = build_model(TINY, rope_theta=250_000.0, max_positions=512)
    assert longer(torch.zeros(1, 257, dtype=torch.long)).shape == (1, 257, 320)


def test_activation_checkpointing_gives_same_gradients(small):
    checkpointed = build_model(SMALL, activation_checkpointing=True)
    checkpointed.load_state_dict(small.state_dict())
    ids = _ids(2, 16)
    grads = []
    for model in (small, checkpointed):
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_initialisation():
    config = ModelConfig(
        name="init", vocab_size=320, hidden_size=256, num_layers=8, num_heads=4,
        num_kv_heads=2, intermediate_size=768, max_position_embeddings=64,
        rope_theta=10_000.0, tokenizer="byte",
    )
    model = build_model(config, seed=3)
    again = build_model(config, seed=3)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    layer = model.layers[0]
    assert layer.attention.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 8)
    assert layer.attention.o_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(layer.attention_norm.weight, torch.ones(256))


def test_meta_build_then_materialise():
    model = build_model(SMALL, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    reference = build_model(SMALL, seed=0)
    ids = _ids(1, 8)
    torch.testing.assert_close(model(ids), reference(ids))


def test_flops_per_token():
    phi4 = get_model_config("phi-4")
    embedding_and_norms = 100_352 * 5120 + (2 * 40 + 1) * 5120
    assert matmul_parameters(phi4) == phi4.parameter_count() - embedding_and_norms
    attention = 12 * 40 * 40 * 128 * 4096
    assert flops_per_token(phi4, 4096) == 6 * matmul_parameters(phi4) + attention
    assert flops_per_token(phi4, 4096) == 94_938_071_040
    assert flops_per_token(phi4, 16_384) - flops_per_token(phi4, 4096) == 12 * 40 * 5120 * 12_288
    # RECIPE.md: ~9.8T tokens on 1,920 H100s in 21 days is about 26% MFU.
    seconds = 21 * 86_400
    utilisation = mfu(9.8e12 / seconds, flops_per_token(phi4, 4096), 989e12, num_devices=1920)
    assert 0.25 < utilisation < 0.28


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_cpu_side():
    gpu_mfu = _load_benchmark("gpu_mfu")
    args = gpu_mfu.parse_args(["--layers", "4", "--seq-len", "4096", "--batch-size", "2"])
    config = gpu_mfu.benchmark_config(args)
    assert (config.hidden_size, config.num_heads, config.num_kv_heads) == (5120, 40, 10)
    assert config.num_layers == 4 and config.vocab_size == 100_352
    report = gpu_mfu.report(config, args, tokens_per_second=10_000.0, world_size=1)
    expected = 10_000.0 * flops_per_token(config, 4096) / 989e12
    assert report["mfu"] == pytest.approx(expected)
    assert report["flops_per_token"] == flops_per_token(config, 4096)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            gpu_mfu.main(["--steps", "1"])
