"""The torch references of `fastrl.ops`, one kernel family per file, gathered in one namespace.

    ref_logprobs.py       token_logprobs                     triton_kernels/logprobs.py
    ref_fused_linear.py   fused_linear_token_logprobs        triton_kernels/fused_linear.py
    ref_policy_loss.py    policy_loss, the shared pieces     triton_kernels/policy_loss.py
    ref_packing.py        pack, unpack, position_ids,        csrc/ (fastrl._C)
                          segment_sum

This module is the dispatcher's `torch` backend (functions called with checked inputs, returning
plain tensors and tuples) and the import path of the shared loss pieces.
"""

from fastrl.ops.ref_fused_linear import fused_linear_token_logprobs
from fastrl.ops.ref_logprobs import token_logprobs
from fastrl.ops.ref_packing import pack, position_ids, segment_sum, unpack
from fastrl.ops.ref_policy_loss import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_surrogate,
    combine_token_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
    prepare_loss_inputs,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "clipped_surrogate",
    "combine_token_loss",
    "fused_linear_token_logprobs",
    "kl_penalty",
    "masked_mean",
    "pack",
    "policy_loss",
    "position_ids",
    "prepare_loss_inputs",
    "segment_sum",
    "token_logprobs",
    "unpack",
]
