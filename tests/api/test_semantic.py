"""Semantic rules beyond the schema: each names the field, the value found and what is allowed."""

from __future__ import annotations

from tests.api.recipes import CORPUS, PRETRAIN, make
from tokenmill.api.loader import parse_resource
from tokenmill.api.semantic import validate


def problems(document, *others, local=True):
    resource, errors = parse_resource(document)
    assert resource is not None, errors
    by_key = {}
    for other in (CORPUS, *others):
        parsed, errs = parse_resource(other)
        assert parsed is not None, errs
        by_key[parsed.key] = parsed
    return [str(p) for p in validate(resource, lambda kind, name: by_key.get((kind, name)), local=local)]


def test_valid_stage_has_no_problems():
    assert problems(PRETRAIN) == []


def test_unknown_model_config():
    (message,) = problems(make(PRETRAIN, model={"config": "phi-5"}))
    assert message.startswith("TrainingStage/pretrain: spec.model.config: unknown model config; known configs: phi-4,")
    assert message.endswith("(found 'phi-5')")


def test_batch_must_divide_over_data_parallel_workers():
    document = make(PRETRAIN, optimization={**PRETRAIN["spec"]["optimization"], "globalBatchSequences": 6})
    (message,) = problems(document)
    assert "spec.optimization.globalBatchSequences: must be a multiple of microBatchSequences x data-parallel " \
           "workers = 2 x 2 (2 pods x 1 per pod) = 4 (found 6)" in message


def test_mixture_that_cannot_supply_its_share():
    document = make(PRETRAIN, optimization={**PRETRAIN["spec"]["optimization"], "totalTokens": 4096})
    (message,) = problems(document)
    assert "spec.datasets[0].epochs: source 'web' cannot supply its share: 60.00% of 4,096 tokens is 2,458 tokens, " \
           "but 1,000 unique tokens x 2 epochs is 2,000; allow at least 2.458 epochs" in message


def test_sequence_length_beyond_positions_needs_rope_change():
    document = make(PRETRAIN, sequenceLength=512, datasets=[{"uri": "s3://bucket/code", "weight": 1.0}],
                    optimization={**PRETRAIN["spec"]["optimization"], "totalTokens": 4096})
    (message,) = problems(document)
    assert "spec.sequenceLength: exceeds the 256 positions the model was trained on; raise ropeBase above 10000" \
           in message
    assert problems(make(document, ropeBase=250000.0)) == []


def test_midtrain_inherits_positions_from_parent_stage():
    midtrain = make(PRETRAIN, stage="midtrain", model={"parent": {"ref": {"kind": "TrainingStage", "name": "pretrain"}}},
                    sequenceLength=1024, datasets=[{"uri": "s3://bucket/code", "weight": 1.0}],
                    optimization={**PRETRAIN["spec"]["optimization"], "totalTokens": 8192})
    midtrain["metadata"]["name"] = "midtrain"
    assert any("exceeds the 256 positions" in m for m in problems(midtrain, PRETRAIN))
    assert problems(make(midtrain, ropeBase=250000.0), PRETRAIN) == []


def test_ref_to_a_kind_that_cannot_produce_the_input():
    dpo = make(PRETRAIN, stage="dpo", model={"parent": {"uri": "s3://bkt/sft"}},
               dpo={"referenceModel": {"uri": "s3://bkt/sft"}})
    (message,) = problems(dpo)
    assert "spec.datasets[0].ref: needs preference pairs, which CorpusFilter/web cannot produce; allowed " \
           "producers: PTSJob, SyntheticDataJob" in message


def test_model_must_come_from_a_training_stage():
    document = make(PRETRAIN, stage="midtrain", model={"parent": {"ref": {"kind": "CorpusFilter", "name": "web"}}})
    assert any("spec.model.parent.ref.kind: a model comes only from a TrainingStage" in m for m in problems(document))


def test_tokenizer_must_fit_the_embedding():
    (message,) = problems(make(PRETRAIN, tokenizer="phi-4"))
    assert "spec.tokenizer: tokenizer phi-4 has 100,352 tokens but tiny embeds only 320" in message


def test_relative_file_uris_are_only_for_the_local_runner():
    document = make(PRETRAIN, datasets=[{"uri": "file:data/web", "weight": 1.0}])
    assert problems(document, local=True) == []
    (message,) = problems(document, local=False)
    assert "spec.datasets[0].uri: relative file: URIs are only for the local runner" in message
