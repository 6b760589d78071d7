"""The Phi-4-family decoder in plain torch, its FLOP count, and the Hugging Face mapping."""

from tokenmill.trainer.model.flops import flops_per_token, matmul_parameters, mfu
from tokenmill.trainer.model.transformer import Block, Transformer, build_model

__all__ = ["Block", "Transformer", "build_model", "flops_per_token", "matmul_parameters", "mfu"]
