"""Generation with an in-process vLLM engine that shares the trainer's weights.

The engine is colocated: it runs in the trainer's process (vLLM's in-process engine core,
`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on the trainer's device. It starts from the model directory the
trainer loaded and is brought up to date in place after every optimizer step by `sync_weights`,
which streams the trainer's parameters one tensor at a time straight into vLLM's own (fused)
tensors with `copy_` (a lazy generator: no second full copy of the model is built; under ZeRO-3
each tensor is gathered just in time by the `gather` context the trainer passes). vLLM's
`reload_weights` is not used: on its CPU backend it leaves the packed GEMM copies of the linear
weights stale. The prefix cache is reset after every sync, since its keys and values were computed
with the old weights. The weight path reaches into the worker's model, so the engine core must run
in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which the engine sets unless told otherwise).

Sampling: one request per prompt (the agent loop plays every group member as its own episode), a
per-request seed derived from the engine seed, the request id and the prompt length, so a run is
reproducible; the turn ends at the stop token, which is kept in the output. Logprobs are vLLM's
`processed_logprobs`: of the distribution actually sampled from (temperature applied, and top-p
when it is below 1), which is what the trainer recomputes at the same temperature when top_p = 1.

Prompts the engine cannot hold (longer than `max_model_len`) come back as an empty, unfinished
output with `error` set; the agent loop ends the episode with that status instead of crashing.

Memory: `gpu_memory_utilization` sizes vLLM's share of the GPU; on CUDA the engine sleeps during
the training phase (level 1: weights offloaded to host memory and restored on wake, KV cache
dropped) and wakes before generation. On CPU both are no-ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fastrl.rollout.types import GenOutput, Sampling

log = logging.getLogger("fastrl.rollout")


def vllm_available() -> bool:
    """True when vLLM can be imported here (without starting anything)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # an install that fails to import is not usable either
        return False
    return True


class VLLMEngine:
    """In-process vLLM `LLM` serving the agent loop, synced in place from the trainer's model."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_dir: str,
        *,
        seed: int = 0,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.3,
        dtype: str | None = None,
        enforce_eager: bool = True,
        gather: Callable[[list[torch.nn.Parameter]], Any] | None = None,
    ):
        # In-process engine core; on CPU the engine shares the trainer's cores, so vLLM must not pin
        # OpenMP threads (set by the user, these win).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError(
                "the colocated vLLM engine syncs weights in process: unset "
                "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        with _repo_triton_kernels_hidden():
            from vllm import LLM

        if not torch.cuda.is_available() or next(model.parameters()).device.type == "cpu":
            _keep_cpu_linear_weights()
        self.model = model
        self.seed = seed
        self.max_model_len = max_model_len
        self.gather = gather
        param = next(model.parameters())
        self.on_cuda = param.device.type == "cuda"
        dtype = dtype or str(param.dtype).removeprefix("torch.")
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op; the trainer keeps its own.
        set_num_threads = torch.set_num_threads
        threads = torch.get_num_threads()
        t0 = time.time()
        try:
            with _repo_triton_kernels_hidden():
                self.llm = LLM(
                    model=model_dir,
                    skip_tokenizer_init=True,  # prompts and outputs are token ids
                    dtype=dtype,
                    seed=seed,
                    max_model_len=max_model_len,
                    gpu_memory_utilization=gpu_memory_utilization,
                    enforce_eager=enforce_eager,
                    enable_prefix_caching=True,  # every turn resends the episode's whole context
                    # Whole prompts only: a partially prefilled request with its own seed crashes
                    # vLLM's CPU runner ("CPU Generator does not use offset").
                    enable_chunked_prefill=False,
                    max_num_batched_tokens=max(max_model_len, 16384),
                    enable_sleep_mode=self.on_cuda,
                    logprobs_mode="processed_logprobs",
                )
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        self.asleep = False
        self._plan_cache: dict[str, tuple[str, int]] | None = None
        log.info(
            "vLLM engine started in %.1fs: %s, dtype %s, max_model_len %d",
            time.time() - t0,
            model_dir,
            dtype,
            max_model_len,
        )

    # -- generation -------------------------------------------------------------------------------

    def _seed(self, rid: str | None, index: int, prompt_len: int) -> int:
        key = f"{self.seed}:{rid if rid is not None else index}:{prompt_len}"
        return zlib.crc32(key.encode())

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        request_ids: list[str] | None = None,
    ) -> list[GenOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rids = request_ids if request_ids is not None else [None] * len(prompts)
        outputs: list[GenOutput | None] = [None] * len(prompts)
        requests, params, slots = [], [], []
        for i, (ids, rid) in enumerate(zip(prompts, rids)):
            room = self.max_model_len - len(ids)
            if room <= 0 or not ids:
                outputs[i] = GenOutput(
                    [],
                    [],
                    False,
                    error=f"prompt of {len(ids)} tokens does not fit the engine's "
                    f"max_model_len={self.max_model_len}",
                )
                continue
            greedy = sampling.temperature <= 0
            params.append(
                SamplingParams(
                    n=1,
                    temperature=0.0 if greedy else sampling.temperature,
                    top_p=1.0 if greedy else sampling.top_p,
                    max_tokens=min(sampling.max_tokens, room),
                    stop_token_ids=(
                        [sampling.stop_token_id] if sampling.stop_token_id is not None else None
                    ),
                    # Like the HF engine: without a stop token only max_tokens ends a turn.
                    ignore_eos=sampling.stop_token_id is None,
                    seed=None if greedy else self._seed(rid, i, len(ids)),
                    logprobs=0,  # the sampled token's own logprob
                    detokenize=False,
                    skip_special_tokens=False,
                )
            )
            requests.append(TokensPrompt(prompt_token_ids=list(ids)))
            slots.append(i)
        if requests:
            results = self.llm.generate(requests, params, use_tqdm=False)
            for i, res in zip(slots, results):
                out = res.outputs[0]
                ids = list(out.token_ids)
                lps = [
                    float(step[tok].logprob) for tok, step in zip(ids, out.logprobs or [])
                ]  # [n]
                finished = (
                    sampling.stop_token_id is not None
                    and bool(ids)
                    and ids[-1] == sampling.stop_token_id
                )
                outputs[i] = GenOutput(ids, lps, finished)
        return [o for o in outputs if o is not None]

    # -- weights ----------------------------------------------------------------------------------

    def _stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The trainer's parameters as (HF name, tensor), one at a time; tied weights once."""
        for name, p in self.model.named_parameters():  # named_parameters drops tied duplicates
            ctx = self.gather([p]) if self.gather is not None else contextlib.nullcontext()
            with ctx:
                yield name, p.detach()

    def _plan(self) -> dict[str, tuple[str, int]]:
        """HF parameter name -> (vLLM parameter name, first row inside it).

        vLLM fuses projections (`qkv_proj` = q, k, v stacked by rows; `gate_up_proj` = gate, up);
        its model class lists them in `packed_modules_mapping`. Row offsets come from the
        trainer's own shapes, in the mapping's order.
        """
        if self._plan_cache is not None:
            return self._plan_cache
        vmodel = self.llm.collective_rpc(lambda worker: worker.model_runner.model)[0]
        fused = getattr(vmodel, "packed_modules_mapping", {}) or {}
        # ZeRO-3 partitions keep the whole shape in `ds_shape`.
        shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in self.model.named_parameters()}
        vnames = {n for n, _ in vmodel.named_parameters()}
        plan: dict[str, tuple[str, int]] = {}
        for name in shapes:
            module, _, leaf = name.rpartition(".")
            parent, _, short = module.rpartition(".")
            target, offset = name, 0
            for packed, parts in fused.items():
                if short in parts:
                    target = f"{parent}.{packed}.{leaf}"
                    for part in parts[: parts.index(short)]:
                        offset += shapes[f"{parent}.{part}.{leaf}"][0]
            if target not in vnames:
                raise RuntimeError(f"vLLM engine has no parameter for {name} (looked for {target})")
            plan[name] = (target, offset)
        self._plan_cache = plan
        return plan

    def sync_weights(self, named_tensors: Any = None) -> None:
        """Copy the trainer's current weights into the engine's tensors in place.

        One tensor at a time, straight into vLLM's (fused) parameters: no second copy of the
        model and no reload machinery. On CPU the engine's GEMM kernels keep packed copies of
        the weights, which are rebuilt afterwards. The prefix cache is then reset.
        """
        stream = iter(named_tensors) if named_tensors is not None else self._stream()
        plan = self._plan()

        def load(worker) -> int:
            vmodel = worker.model_runner.model
            params = dict(vmodel.named_parameters())
            n = 0
            with torch.no_grad():
                for name, tensor in stream:
                    target, offset = plan[name]
                    params[target][offset : offset + tensor.shape[0]].copy_(tensor)
                    n += 1
            if next(vmodel.parameters()).device.type == "cpu":
                _repack_cpu_linears(vmodel)
            return n

        loaded = self.llm.collective_rpc(load)[0]
        if loaded != len(plan) and named_tensors is None:
            raise RuntimeError(f"weight sync copied {loaded} of {len(plan)} tensors")
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the GPU for training (weights to host memory, KV cache dropped); CPU: no-op."""
        if self.on_cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.on_cuda and self.asleep:
            self.llm.wake_up()
            self.asleep = False


def _keep_cpu_linear_weights() -> None:
    """Make vLLM's CPU backend keep each linear layer's weight next to its packed GEMM copy.

    By default the CPU backend packs a linear layer's weight for oneDNN and drops the parameter,
    so an in-place update has nothing to write into (and vLLM's own `reload_weights` leaves the
    packed copies stale there). Keeping the weight costs one extra copy of the linear weights in
    host memory; `_repack_cpu_linears` rebuilds the packed copies after a sync.
    """
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "keeps_weight", False):
        return

    def keep(layer: torch.nn.Module, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    keep.keeps_weight = True  # type: ignore[attr-defined]
    keep.original = dispatch  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = keep


def _repack_cpu_linears(vmodel: torch.nn.Module) -> None:
    """Rebuild the packed GEMM copy of every CPU linear layer from its (just updated) weight."""
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    for module in vmodel.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.ndim == 2:
            dispatch(module, remove_weight=False)


@contextlib.contextmanager
def _repo_triton_kernels_hidden() -> Iterator[None]:
    """Keep a source checkout's top-level `triton_kernels/` folder (installed as
    `fastrl.triton_kernels`) from posing as OpenAI's optional `triton_kernels` package while vLLM
    probes for it: run from the repository root, the folder is importable under that name."""
    import importlib.util
    import sys
    from pathlib import Path

    ours = Path(__file__).resolve().parents[3] / "triton_kernels"
    try:
        spec = importlib.util.find_spec("triton_kernels")
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if origin != ours:
        yield
        return
    removed = [(i, p) for i, p in enumerate(sys.path) if Path(p or ".").resolve() == ours.parent]
    for i, _ in reversed(removed):
        del sys.path[i]
    cached = sys.modules.pop("triton_kernels", None)
    try:
        yield
    finally:
        for i, p in removed:
            sys.path.insert(i, p)
        if cached is not None:
            sys.modules.setdefault("triton_kernels", cached)
