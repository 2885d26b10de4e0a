"""Triton kernels of fastrl, installed as `fastrl.triton_kernels` (never as top-level
`triton_kernels`, which would shadow OpenAI Triton's package of that name).

One kernel family per file. They import only torch and triton: `fastrl.ops` checks the inputs,
dispatches to them (or to its torch references) and wraps the tuples they return.
"""

from .fused_linear import fused_linear_token_logprobs
from .logprobs import token_logprobs
from .policy_loss import policy_loss  # the function shadows its submodule's name

__all__ = ["fused_linear_token_logprobs", "policy_loss", "token_logprobs"]
