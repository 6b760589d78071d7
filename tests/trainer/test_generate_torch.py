"""The torch generation engine against transformers and against a full forward pass."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers

from tests.trainer.generate_fixtures import export_tiny, tiny_model
from tokenmill.trainer.generate import (
    GenerationInputError,
    GenerationRequest,
    SamplingParams,
    TorchEngine,
    load_torch_engine,
)
from tokenmill.trainer.tokenizer import get_tokenizer

PROMPTS = ["Once upon a time", "The", "def main():\n    return 4", "x" * 40, "1, 2, 3,"]
BYTE = get_tokenizer("byte")
STOPS = [BYTE.eos_id, BYTE.eot_id]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("tiny-gen"))


@pytest.fixture
def engine(export_dir):
    return load_torch_engine(f"file://{export_dir}", device="cpu")


@pytest.fixture(scope="module")
def hf_model(export_dir):
    return transformers.Phi3ForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()


def _ids(text: str) -> tuple[int, ...]:
    return tuple(BYTE.encode(text))


def test_greedy_matches_transformers_generate(engine, hf_model):
    requests = [GenerationRequest(prompt_token_ids=_ids(p), sampling=SamplingParams(temperature=0, max_tokens=40))
                for p in PROMPTS]
    outputs = engine.generate(requests)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = torch.tensor([_ids(prompt)])
        with torch.no_grad():
            theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                       do_sample=False, eos_token_id=STOPS, pad_token_id=BYTE.pad_id)
        expected = theirs[0, ids.shape[1]:].tolist()
        (completion,) = output.completions
        assert completion.token_ids == expected, prompt
        assert completion.prompt_tokens == len(_ids(prompt))
        stopped = expected[-1] in STOPS
        assert completion.finish_reason == ("stop" if stopped else "length")
        assert completion.text == BYTE.decode(expected[:-1] if stopped else expected)


@pytest.mark.parametrize("max_shared_prompts", [8, 0], ids=["shared-prompt-segments", "per-row-segments"])
def test_logprobs_equal_a_full_forward(export_dir, max_shared_prompts):
    engine = load_torch_engine(f"file://{export_dir}", device="cpu", max_shared_prompts=max_shared_prompts)
    sampling = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=30, seed=3, logprobs=True, top_logprobs=3)
    # different lengths: rows leave the batch at different steps, the rest decode on
    padded = [GenerationRequest(prompt_token_ids=_ids(p), n=2, sampling=replace(sampling, max_tokens=6 + 12 * i))
              for i, p in enumerate(PROMPTS[:3])]
    alone = [GenerationRequest(prompt_token_ids=_ids(PROMPTS[3]), n=2, sampling=sampling)]  # no padding: no mask
    for output in engine.generate(padded) + engine.generate(alone):
        prompt = list(output.request.prompt_token_ids)
        for completion in output.completions:
            full = torch.tensor([prompt + completion.token_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(engine.model(full)[0].float(), dim=-1)
            steps = logprobs[len(prompt) - 1:-1]
            expected = steps.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)
            top = steps.topk(3, dim=-1)
            assert [[t.token_id for t in step] for step in completion.top_logprobs] == top.indices.tolist()
            torch.testing.assert_close(
                torch.tensor([[t.logprob for t in step] for step in completion.top_logprobs]),
                top.values, atol=1e-4, rtol=0)


def test_seeded_samples_reproduce_and_do_not_depend_on_the_batch(export_dir):
    sampling = SamplingParams(temperature=1.0, max_tokens=24, seed=7)
    request = GenerationRequest(prompt_token_ids=_ids("Once upon"), n=4, sampling=sampling)
    first = load_torch_engine(f"file://{export_dir}", device="cpu").generate([request])[0]
    again = load_torch_engine(f"file://{export_dir}", device="cpu")
    other = GenerationRequest(prompt_token_ids=_ids("Another prompt entirely"), n=3, sampling=sampling)
    second = again.generate([other, request])[1]
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in second.completions]
    assert len({tuple(c.token_ids) for c in first.completions}) > 1, "samples of one request differ"
    alone = again.generate([request.with_indices([2])])[0].completions
    assert [c.index for c in alone] == [2] and alone[0].token_ids == first.completions[2].token_ids
    reseeded = again.generate([GenerationRequest(prompt_token_ids=request.prompt_token_ids, n=4,
                                                 sampling=SamplingParams(temperature=1.0, max_tokens=24, seed=8))])
    assert [c.token_ids for c in reseeded[0].completions] != [c.token_ids for c in first.completions]


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss(export_dir):
    solution = _ids("Question: what is 6 times 7? Answer: it is forty-two, since 6*7 = 42.")
    prefixes = [solution[:k] for k in range(20, len(solution), 8)]
    sampling = SamplingParams(temperature=0.8, max_tokens=16, seed=11, logprobs=True)
    cold = [load_torch_engine(f"file://{export_dir}", device="cpu", prefix_cache_tokens=0)
            .generate([GenerationRequest(prompt_token_ids=p, n=3, sampling=sampling)])[0]
            for p in prefixes]
    warm_engine = load_torch_engine(f"file://{export_dir}", device="cpu")
    warm = [warm_engine.generate([GenerationRequest(prompt_token_ids=p, n=3, sampling=sampling)])[0]
            for p in prefixes]
    assert warm_engine.prefix_cache.hits == len(prefixes) - 1
    # each successive prefix computed only its new tokens
    assert warm_engine.prefill_tokens == len(prefixes[-1])
    for a, b in zip(cold, warm, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        for x, y in zip(a.completions, b.completions, strict=True):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


def test_n_samples_share_one_prefill(engine):
    prompt = _ids("Shared prompt for many rollouts")
    engine.generate([GenerationRequest(prompt_token_ids=prompt, n=16, sampling=SamplingParams(max_tokens=4, seed=1))])
    assert engine.prefill_tokens == len(prompt)


def test_chat_template_and_stop_on_end_of_turn(export_dir):
    engine = load_torch_engine(f"file://{export_dir}", device="cpu")
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    expected_prompt = BYTE.encode_chat(list(messages), add_generation_prompt=True)
    rendered = BYTE.encode(BYTE.apply_chat_template(list(messages), add_generation_prompt=True), allow_special=True)
    assert expected_prompt == rendered
    request = GenerationRequest(messages=messages, sampling=SamplingParams(temperature=0, max_tokens=50))
    first = engine.generate([request])[0].completions[0].token_ids[0]
    ended = copy.deepcopy(engine.model)
    with torch.no_grad():  # the greedy first token and end-of-turn swap places in the head
        head = ended.lm_head.weight
        head[[first, BYTE.eos_id]] = head[[BYTE.eos_id, first]]
    (out,) = TorchEngine(ended, BYTE).generate([request])
    (completion,) = out.completions
    assert completion.prompt_tokens == len(expected_prompt)
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == BYTE.eos_id
    assert completion.token_ids == [BYTE.eos_id] and completion.text == ""


def test_stop_strings_and_stop_ids(engine):
    greedy = SamplingParams(temperature=0, max_tokens=40)
    (plain,) = engine.generate([GenerationRequest(prompt_token_ids=_ids("Once"), sampling=greedy)])
    tokens = plain.completions[0].token_ids
    text = plain.completions[0].text
    stop_text = text[5:8]
    cut = text.find(stop_text)
    stop_id = tokens[10]
    (by_text, by_id) = engine.generate([
        GenerationRequest(prompt_token_ids=_ids("Once"), sampling=SamplingParams(temperature=0, max_tokens=40, stop=(stop_text,))),
        GenerationRequest(prompt_token_ids=_ids("Once"), sampling=SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(stop_id,))),
    ])
    assert by_text.completions[0].text == text[:cut] and by_text.completions[0].finish_reason == "stop"
    first = tokens.index(stop_id)
    assert by_id.completions[0].token_ids == tokens[:first + 1]
    assert by_id.completions[0].finish_reason == "stop"


def test_bad_requests_fail_before_generation(engine):
    long_prompt = GenerationRequest(prompt_token_ids=tuple([65] * 300))
    with pytest.raises(GenerationInputError, match=r"requests\[1\].*300 tokens.*context is 256"):
        engine.generate([GenerationRequest(prompt_token_ids=(65,)), long_prompt])
    with pytest.raises(GenerationInputError, match=r"requests\[0\]\.n"):
        engine.generate([GenerationRequest(prompt_token_ids=(65,), n=0)])
    with pytest.raises(GenerationInputError, match=r"maxTokens"):
        engine.generate([GenerationRequest(prompt_token_ids=(65,), sampling=SamplingParams(max_tokens=0))])
    with pytest.raises(GenerationInputError, match=r"promptTokenIds: id 999"):
        engine.generate([GenerationRequest(prompt_token_ids=(999,))])
    assert engine.prefill_tokens == 0


def _tiny_engine(**options) -> TorchEngine:
    return TorchEngine(tiny_model(0), BYTE, **options)


def test_shared_prompt_segments_and_per_row_segments_give_the_same_samples():
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, max_tokens=20, seed=5, logprobs=True)
    requests = [GenerationRequest(prompt_token_ids=_ids(p), n=3, sampling=sampling) for p in PROMPTS]
    shared = _tiny_engine().generate(requests)  # 5 prompts, 3 samples each: shared segments
    per_row = _tiny_engine(max_shared_prompts=0).generate(requests)  # left-padded per-row segment
    for a, b in zip(shared, per_row, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        for x, y in zip(a.completions, b.completions, strict=True):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


def test_samples_keep_to_top_k_and_nucleus_and_do_not_depend_on_their_batch_mates():
    model = tiny_model(0, sharpness=1.0)  # flat distributions: the filters have work to do
    top_k = GenerationRequest(prompt_token_ids=_ids("Once upon"), n=6,
                              sampling=SamplingParams(temperature=1.5, top_k=5, max_tokens=24, seed=1))
    nucleus = GenerationRequest(prompt_token_ids=_ids("The cat"), n=6,
                                sampling=SamplingParams(temperature=1.0, top_p=0.3, max_tokens=24, seed=2))
    greedy = GenerationRequest(prompt_token_ids=_ids("x = "), sampling=SamplingParams(temperature=0, max_tokens=24))
    together = TorchEngine(model, BYTE).generate([top_k, nucleus, greedy])
    for request, output in zip([top_k, nucleus, greedy], together, strict=True):
        (alone,) = TorchEngine(model, BYTE).generate([request])
        assert [c.token_ids for c in alone.completions] == [c.token_ids for c in output.completions]
    for output in together:
        params = output.request.sampling
        prompt = list(output.request.prompt_token_ids)
        for completion in output.completions:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion.token_ids]))[0, len(prompt) - 1:-1].float()
            for step, token in enumerate(completion.token_ids):
                probs = torch.softmax(logits[step] / (params.temperature or 1.0), dim=-1)
                more_likely = probs > probs[token]
                if params.temperature == 0:
                    assert not more_likely.any()
                if params.top_k:
                    assert int(more_likely.sum()) < params.top_k
                if params.top_p < 1:
                    assert float(probs[more_likely].sum()) < params.top_p
    assert len({tuple(c.token_ids) for c in together[0].completions}) > 1
