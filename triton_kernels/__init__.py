"""Triton kernels of fastrl, installed as `fastrl.triton_kernels` (never as top-level
`triton_kernels`, which would shadow OpenAI Triton's package of that name).

One kernel family per file; `fastrl.ops` dispatches to them and falls back to its torch references.
"""
