"""Fused Triton ops for masked autoencoders (needs only torch and triton).

CUDA tensors run the Triton kernels; CPU tensors run the pure-torch references in
`kernels.reference`, unless `TRITON_INTERPRET=1`, which runs the Triton code on the CPU.
`patch_mae(model)` puts the masking and restore ops into an MAE-family model in one call.
"""

from kernels.cls_topk import cls_attention_topk
from kernels.cross_attention import cross_attention
from kernels.mae_patch import patch_mae, unpatch_mae
from kernels.masking import random_masking
from kernels.restore import restore_tokens

OPS = ("cls_attention_topk", "cross_attention", "random_masking", "restore_tokens")
"""The fused ops; each has `kernels.reference.<op>_reference` with the same semantics."""

__all__ = ["cls_attention_topk", "cross_attention", "random_masking", "restore_tokens", "patch_mae", "unpatch_mae"]
