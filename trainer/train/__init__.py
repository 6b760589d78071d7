"""The TrainingStage workload (stages pretrain and midtrain): `workload.run(spec_uri)`.

- `prepare`: validation before compute (model config, positions vs RoPE, datasets, mixture plan)
  and the packed sources.
- `loop`: the per-worker Ray Train loop (DDP/gloo on CPU, FSDP2 on GPUs), metrics, progress.
- `checkpoint`: DCP checkpoints into the store, parent weights, the Hugging Face export.
- `workload`: the driver (`python -m tokenmill.trainer training-stage --spec <uri>`).
"""
