"""Small valid resources the API tests mutate."""

from __future__ import annotations

import copy
from typing import Any

PRETRAIN: dict[str, Any] = {
    "apiVersion": "tokenmill.dev/v1alpha1",
    "kind": "TrainingStage",
    "metadata": {"name": "pretrain"},
    "spec": {
        "stage": "pretrain",
        "model": {"config": "tiny"},
        "datasets": [
            {"ref": {"kind": "CorpusFilter", "name": "web"}, "weight": 0.6, "epochs": 2, "uniqueTokens": 1000},
            {"uri": "s3://bucket/code", "weight": 0.4, "epochs": 1},
        ],
        "sequenceLength": 128,
        "optimization": {"globalBatchSequences": 8, "microBatchSequences": 2, "peakLearningRate": 1e-3,
                         "totalTokens": 2048},
        "ray": {"workers": {"replicas": 2, "gpusPerWorker": 0}},
    },
}

CORPUS: dict[str, Any] = {
    "apiVersion": "tokenmill.dev/v1alpha1",
    "kind": "CorpusFilter",
    "metadata": {"name": "web"},
    "spec": {"inputs": [{"name": "raw", "uri": "s3://bucket/raw"}]},
}


def make(base: dict[str, Any], **spec_changes: Any) -> dict[str, Any]:
    document = copy.deepcopy(base)
    document["spec"].update(spec_changes)
    return document
