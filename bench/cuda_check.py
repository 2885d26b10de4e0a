"""Ahead-of-time compile check for Hopper (sm_90): every Triton kernel and the CUDA extension.

    python bench/cuda_check.py                     # or `make cuda-check`; writes the JSON below
    python bench/cuda_check.py --skip-csrc         # Triton kernels only (about a minute)
    python bench/cuda_check.py --only fwd --triton-dir /tmp/broken_kernels --skip-csrc

No GPU is needed: Triton's own compiler lowers each kernel to an sm_90 cubin (`triton.compile`
with `GPUTarget("cuda", 90, 32)`; triton ships ptxas), and nvcc compiles `csrc/` compile-only.

Triton: the plan below enumerates, for the benchmark shapes (materialized logits N=32768,
V=160000; fused linear M=16384, H=4096, V=131072; policy loss B=512, T=4096), every dtype and
every launch configuration (block size, num_warps) that `fastrl.ops` and `triton_kernels/` pick,
taken from the launchers' own helpers, and the kernels' compile-time feature flags: all of them
for the token-statistics kernels; for the policy loss, every aggregation and KL estimator and the
all-on set (its register high-water mark). Arguments are specialized as Triton's JIT does
(an int equal to 1 becomes a constant, ints and pointers divisible by 16 get the divisibility
hint). Each configuration's ptx is assembled once more by the same ptxas with `-v` to read its
registers per thread and spilled bytes; Triton's metadata gives the shared memory.

csrc: `ops_cuda.cu` with nvcc for sm_90a and sm_80 (`-Xptxas -v`, warnings as errors, torch's
headers as system headers) and the C++ files with the host compiler (`-Wall -Werror`,
syntax only), against this torch's headers. nvcc is the `nvidia-cuda-nvcc` wheel of the dev extra
when installed, else the one on PATH.

Occupancy on H100 (SXM, sm_90) from registers, shared memory and warps per block: 65536 registers
and 228 KiB of shared memory per SM (227 KiB at most per block, 1 KiB of it reserved per block),
64 warps and 32 blocks per SM; registers are allocated per warp in units of 256.

Fails (exit 1, one line starting `cuda-check: FAIL`) on a compile error, on shared memory over
the per-block limit, and on spilled bytes in a configuration not named in the spill allowlist of
`bench/NOTES.md` (section "Spill allowlist": lines "- `<config id, * for any text>`: reason").
Writes `bench/results/sm90_compile.json`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Triton 3.9 warns when this is unset; fusion on is its default, and the runtime's.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "sm90_compile.json"
NOTES = ROOT / "bench" / "NOTES.md"

# Benchmark shapes the plan is drawn for.
LOGITS_SHAPE = {"N": 32768, "V": 160000}
FUSED_SHAPE = {"M": 16384, "H": 4096, "V": 131072}
LOSS_SHAPE = {"B": 512, "T": 4096}
# Control ids the trainer probes (`<tool_call>`, `{`, `<|im_end|>`): K = 3.
N_CONTROL = 3

# H100 SXM (compute capability 9.0) limits.
H100 = {
    "regs_per_sm": 65536,
    "reg_alloc_unit": 256,  # registers, per warp
    "max_regs_per_thread": 255,
    "smem_per_sm": 228 * 1024,
    "smem_per_block": 227 * 1024,
    "smem_reserved_per_block": 1024,
    "smem_alloc_unit": 128,
    "warps_per_sm": 64,
    "blocks_per_sm": 32,
}

FAIL_PREFIX = "cuda-check: FAIL"


class CheckError(Exception):
    """A failed check; its message is the one line printed."""


# --------------------------------------------------------------------------------------------
# Occupancy and limits
# --------------------------------------------------------------------------------------------


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int, limits: dict = H100) -> dict:
    """Resident blocks per SM and the fraction of the SM's warps they fill, with the limiter."""
    regs_per_warp = _round_up(max(registers, 1) * 32, limits["reg_alloc_unit"])
    by = {
        "warps": limits["warps_per_sm"] // num_warps,
        "registers": limits["regs_per_sm"] // (regs_per_warp * num_warps),
        "blocks": limits["blocks_per_sm"],
    }
    if shared_bytes > 0:
        per_block = _round_up(shared_bytes, limits["smem_alloc_unit"])
        by["shared"] = limits["smem_per_sm"] // (per_block + limits["smem_reserved_per_block"])
    blocks = min(by.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "fraction": round(blocks * num_warps / limits["warps_per_sm"], 4),
        "limited_by": min(by, key=lambda k: (by[k], k != "registers")),
    }


def spill_allowlist(notes: Path = NOTES) -> dict[str, str]:
    """`{pattern: reason}` from the "Spill allowlist" section of bench/NOTES.md."""
    if not notes.exists():
        return {}
    allowed: dict[str, str] = {}
    in_section = False
    for line in notes.read_text().splitlines():
        if line.startswith("#"):
            in_section = "spill allowlist" in line.lower()
            continue
        match = re.match(r"[-*]\s+`([^`]+)`\s*:\s*(\S.*)", line) if in_section else None
        if match:
            allowed[match.group(1)] = match.group(2).strip()
    return allowed


def spill_reason(config_id: str, allowed: dict[str, str]) -> str | None:
    """The reason of the first pattern that matches the whole id; `*` matches any text (ids hold
    brackets, so this is no fnmatch glob)."""
    for pattern, reason in allowed.items():
        if re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), config_id):
            return reason
    return None


def limit_failures(records: list[dict], allowed: dict[str, str]) -> list[str]:
    """One line per record over the shared-memory limit or with spills nobody explained."""
    failures = []
    for rec in records:
        if rec["shared_bytes"] > H100["smem_per_block"]:
            failures.append(
                f"{rec['id']}: {rec['shared_bytes']} bytes of shared memory per block "
                f"> H100 limit {H100['smem_per_block']}"
            )
        spilled = rec["spill_stores"] + rec["spill_loads"]
        if spilled and spill_reason(rec["id"], allowed) is None:
            failures.append(
                f"{rec['id']}: spills {rec['spill_stores']} bytes stored / {rec['spill_loads']}"
                " loaded, not in the spill allowlist of bench/NOTES.md"
            )
    return failures


# --------------------------------------------------------------------------------------------
# ptxas resource reports
# --------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> list[dict]:
    """Entries `{function, arch, registers, stack_frame, spill_stores, spill_loads, static_smem}`
    of a `ptxas -v` log (one per compiled entry function and arch)."""
    entries: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"function": m.group(1), "arch": m.group(2), "registers": 0}
            current.update(stack_frame=0, spill_stores=0, spill_loads=0, static_smem=0)
            entries.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current["stack_frame"], current["spill_stores"], current["spill_loads"] = map(
                int, m.groups()
            )
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            current["static_smem"] = int(m.group(2) or 0)
    return entries


# --------------------------------------------------------------------------------------------
# Triton: the plan
# --------------------------------------------------------------------------------------------


@dataclass
class KernelConfig:
    """One compile: a kernel, example runtime arguments (for specialization) and constexprs."""

    family: str
    kernel: object  # triton JITFunction
    args: dict  # runtime argument -> example value: a dtype string "*bf16" for pointers
    constexprs: dict
    num_warps: int
    used_by: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.family}.{self.kernel.fn.__name__}"

    def signature(self) -> tuple[dict, dict, dict]:
        """Triton signature, constants and attrs, specialized as the JIT does."""
        sig, consts, attrs = {}, dict(self.constexprs), {}
        for index, param in enumerate(self.kernel.params):
            name = param.name
            if param.is_constexpr:
                sig[name] = "constexpr"
                continue
            value = self.args[name]
            if isinstance(value, str):  # a pointer, allocated by torch: 16-byte aligned
                sig[name] = value
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                sig[name] = "u1"
            elif isinstance(value, int):
                if value == 1:
                    sig[name], consts[name] = "constexpr", 1
                    continue
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                annotation = getattr(param, "annotation_type", None)
                sig[name] = annotation or "fp32"
        return sig, consts, attrs

    def variant(self) -> str:
        ptrs = sorted({v[1:] for v in self.args.values() if isinstance(v, str)})
        flags = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.constexprs.items()))
        return f"{'+'.join(ptrs)}[{flags}]w{self.num_warps}"

    @property
    def id(self) -> str:
        return f"{self.name}:{self.variant()}"


def _short(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    return str(value).replace("triton.language.", "").replace("tl.", "")


def load_kernels(triton_dir: Path):
    """Import the kernel package at `triton_dir` (normally `triton_kernels/`) under its own name."""
    name = "_cuda_check_triton_kernels"
    spec = importlib.util.spec_from_file_location(
        name, triton_dir / "__init__.py", submodule_search_locations=[str(triton_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def logprobs_plan(lp) -> list[KernelConfig]:
    """Token-statistics kernels, as `stats_forward`/`stats_backward` launch them on CUDA."""
    import torch
    import triton

    cuda = torch.device("cuda")
    uses = {
        "token_logprobs N={N} V={V}".format(**LOGITS_SHAPE): LOGITS_SHAPE["V"],
        "fused_linear M={M} H={H} V={V}".format(**FUSED_SHAPE): FUSED_SHAPE["V"],
    }
    configs = []
    for use, vocab in uses.items():
        block = lp.block_size(vocab, cuda)
        warps = lp._launch_opts(block, cuda)["num_warps"]
        for dtype in ("bf16", "fp16", "fp32"):
            for entropy, control in itertools.product((True, False), repeat=2):
                k = N_CONTROL if control else 0
                args = {
                    "logits_ptr": f"*{dtype}",
                    "stride_row": vocab,
                    "labels_ptr": "*i64",
                    "lse_ptr": "*fp32",
                    "logprobs_ptr": "*fp32",
                    "entropy_ptr": "*fp32",
                    "control_ids_ptr": "*i64",
                    "control_ptr": "*fp32",
                    "V": vocab,
                    "K": k,
                    "ignore_index": -100,
                    "inv_temp": 1.0,
                }
                consts = {
                    "WITH_ENTROPY": entropy,
                    "HAS_CONTROL": control,
                    "BLOCK_V": block,
                    "BLOCK_K": triton.next_power_of_2(max(k, 1)),
                }
                configs.append(
                    KernelConfig("logprobs", lp._token_stats_fwd_kernel, args, consts, warps, [use])
                )
            # Backward runs when logprobs, entropy or both carry a gradient.
            for grad_lp, grad_h in ((True, True), (True, False), (False, True)):
                args = {
                    "logits_ptr": f"*{dtype}",
                    "stride_row": vocab,
                    "grad_ptr": f"*{dtype}",
                    "grad_stride_row": vocab,
                    "labels_ptr": "*i64",
                    "lse_ptr": "*fp32",
                    "entropy_ptr": "*fp32",
                    "grad_logprobs_ptr": "*fp32",
                    "grad_entropy_ptr": "*fp32",
                    "V": vocab,
                    "ignore_index": -100,
                    "inv_temp": 1.0,
                }
                consts = {
                    "HAS_GRAD_LOGPROBS": grad_lp,
                    "HAS_GRAD_ENTROPY": grad_h,
                    "BLOCK_V": block,
                }
                configs.append(
                    KernelConfig("logprobs", lp._token_stats_bwd_kernel, args, consts, warps, [use])
                )
    return configs


# Policy-loss feature sets: the all-on set (register high-water mark), each KL estimator, each
# aggregation, no entropy term, and the no-gradient (evaluation) pass.
# name: (dual clip, reference, KL in the loss, KL estimator, entropy, entropy in the loss,
#        aggregation, gradients written)
_LOSS_FEATURES = {
    "all-k3": (True, True, True, "k3", True, True, "seq-mean-token-mean", True),
    "all-k1": (True, True, True, "k1", True, True, "seq-mean-token-mean", True),
    "all-k2": (True, True, True, "k2", True, True, "seq-mean-token-mean", True),
    "grpo": (False, True, True, "k3", True, False, "token-mean", True),
    "plain": (False, False, False, "k3", False, False, "token-mean", True),
    "drgrpo": (True, True, True, "k3", True, True, "seq-mean-token-sum-norm", True),
    "sum": (False, True, False, "k3", True, False, "seq-mean-token-sum", True),
    "eval": (True, True, True, "k3", True, True, "token-mean", False),
}


def policy_loss_plan(pl) -> list[KernelConfig]:
    """Rows and finalize kernels of `_launch` at B x T, for fp32 and bf16 inputs (fp32
    accumulation) and fp64 inputs (fp64 accumulation); bool masks travel as uint8."""
    import torch
    import triton.language as tl

    b, t = LOSS_SHAPE["B"], LOSS_SHAPE["T"]
    use = f"policy_loss B={b} T={t}"
    configs = []
    inputs = {"fp32": torch.float32, "bf16": torch.float32, "fp64": torch.float64}  # -> acc
    for dtype, torch_acc in inputs.items():
        acc_ptr = "*fp64" if torch_acc == torch.float64 else "*fp32"
        tl_acc = tl.float64 if torch_acc == torch.float64 else tl.float32
        launch = pl.launch_config(b, t, torch_acc)
        for dual, ref, kl, est, ent, use_ent, agg, grad in _LOSS_FEATURES.values():
            args = {
                "lp_ptr": f"*{dtype}",
                "old_ptr": f"*{dtype}",
                "adv_ptr": f"*{dtype}",
                "mask_ptr": "*u8",
                "ref_ptr": f"*{dtype}",
                "ent_ptr": f"*{dtype}",
                "grad_lp_ptr": acc_ptr,
                "grad_ent_ptr": acc_ptr,
                "partial_ptr": acc_ptr,
                "T": t,
                # (B, T) row-major tensors; advantages (B,) expanded over T: strides (1, 0);
                # a missing reference or entropy is passed with strides (0, 0).
                **{f"s_{n}_b": t for n in ("lp", "old", "m")},
                **{f"s_{n}_t": 1 for n in ("lp", "old", "m")},
                "s_ref_b": t if ref else 0,
                "s_ref_t": 1 if ref else 0,
                "s_ent_b": t if ent else 0,
                "s_ent_t": 1 if ent else 0,
                "s_adv_b": 1,
                "s_adv_t": 0,
                "clip_lo": 0.8,
                "clip_hi": 1.2,
                "dual_clip": 3.0,
                "kl_coef": 0.01,
                "ent_coef": 0.001,
                "norm_len": float(t),
            }
            consts = {
                "ACC": tl_acc,
                "HAS_DUAL": dual,
                "HAS_REF": ref,
                "USE_KL": ref and kl,
                "KL_EST": pl.KL_ESTIMATOR_CODES[est],
                "HAS_ENT": ent,
                "USE_ENT": ent and use_ent,
                "ROW_MEAN": agg == "seq-mean-token-mean",
                "ROW_NORM": agg == "seq-mean-token-sum-norm",
                "WRITE_GRAD_LP": grad,
                "WRITE_GRAD_ENT": grad and ent and use_ent,
                "N_TERMS": 13 if torch_acc == torch.float64 else 7,
                "NP": pl.N_PARTIALS,
                "BLOCK_T": launch.block_t,
            }
            rows = pl._policy_loss_rows_kernel
            configs.append(
                KernelConfig("policy_loss", rows, args, consts, launch.rows_warps, [use])
            )
        for token_mean in (True, False):
            args = {
                "partial_ptr": acc_ptr,
                "loss_ptr": f"*{dtype}",
                "stats_ptr": acc_ptr,
                "inv_norm_ptr": acc_ptr,
                "B": b,
            }
            consts = {
                "ACC": tl_acc,
                "TOKEN_MEAN": token_mean,
                "NP": pl.N_PARTIALS,
                "BLOCK_B": launch.block_b,
            }
            final = pl._policy_loss_finalize_kernel
            configs.append(
                KernelConfig("policy_loss", final, args, consts, launch.finalize_warps, [use])
            )
    return configs


def triton_plan(package) -> list[KernelConfig]:
    """Every configuration, the duplicates (same compile for two uses) merged."""
    lp = sys.modules[package.__name__ + ".logprobs"]
    pl = sys.modules[package.__name__ + ".policy_loss"]
    merged: dict[str, KernelConfig] = {}
    for cfg in logprobs_plan(lp) + policy_loss_plan(pl):
        key = cfg.id + repr(cfg.signature())
        if key in merged:
            merged[key].used_by.extend(u for u in cfg.used_by if u not in merged[key].used_by)
        else:
            merged[key] = cfg
    return list(merged.values())


# --------------------------------------------------------------------------------------------
# Triton: compile and measure
# --------------------------------------------------------------------------------------------


def _ptxas_path() -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(90).path  # triton >= 3.5 picks the ptxas by arch
    except TypeError:
        return nv.get_ptxas().path


def compile_triton(cfg: KernelConfig, arch: int = 90) -> dict:
    """Compile one configuration for sm_`arch`; its resource record (raises CheckError)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = cfg.signature()
    start = time.perf_counter()
    try:
        source = ASTSource(cfg.kernel, sig, consts, attrs)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.num_warps}
        )
    except Exception as error:  # CompilationError, PTXASError, MLIR errors
        first = str(error).strip().splitlines()
        detail = next((line for line in first if "rror" in line), first[-1] if first else "")
        raise CheckError(f"{cfg.id}: compile error: {type(error).__name__}: {detail}") from error
    seconds = time.perf_counter() - start
    meta = compiled.metadata
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run(
            [_ptxas_path(), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={sm}", str(ptx),
             "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
    if result.returncode != 0:
        raise CheckError(f"{cfg.id}: ptxas failed: {result.stderr.strip().splitlines()[-1:]}")
    report = parse_ptxas(result.stdout + result.stderr)
    if not report:
        raise CheckError(f"{cfg.id}: no resource report from ptxas -v")
    entry = report[0]
    shared = int(meta.shared) + entry["static_smem"]
    return {
        "id": cfg.id,
        "kernel": cfg.name,
        "used_by": cfg.used_by,
        "signature": {k: v for k, v in sig.items() if v != "constexpr"},
        "constexprs": {k: _short(v) for k, v in consts.items()},
        "num_warps": cfg.num_warps,
        "num_stages": meta.num_stages,
        "registers": entry["registers"],
        "spill_stores": entry["spill_stores"],
        "spill_loads": entry["spill_loads"],
        "stack_frame": entry["stack_frame"],
        "shared_bytes": shared,
        "occupancy_h100": occupancy(entry["registers"], shared, cfg.num_warps),
        "compile_s": round(seconds, 2),
    }


# --------------------------------------------------------------------------------------------
# csrc: nvcc and the host compiler
# --------------------------------------------------------------------------------------------

ARCHES = {
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
}


def find_nvcc() -> tuple[str, str]:
    """(nvcc path, where it came from): the nvidia-cuda-nvcc wheel first, then PATH."""
    try:
        import nvidia

        for base in map(Path, nvidia.__path__):
            for candidate in sorted(base.glob("cu*/bin/nvcc")) + [base / "cuda_nvcc/bin/nvcc"]:
                if candidate.exists():
                    return str(candidate), "pip (nvidia-cuda-nvcc)"
    except ImportError:
        pass
    found = shutil.which("nvcc")
    if found:
        return found, "PATH"
    raise CheckError("csrc: no nvcc (pip install the dev extra, or put CUDA's nvcc on PATH)")


def _torch_flags(tmp: Path, csrc: Path) -> list[str]:
    """Defines and include flags of this torch (its headers as system headers)."""
    import torch
    from torch.utils import cpp_extension

    includes = list(cpp_extension.include_paths())
    macros = Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():  # the CPU wheel lacks this generated header of build switches
        stub = tmp / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n")
        includes.append(str(tmp))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-DFASTRL_WITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C"]
    for path in (*includes, sysconfig.get_paths()["include"]):
        flags += ["-isystem", path]
    return flags + [f"-I{csrc}"]


def _version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{match.group(1)} ({match.group(2)})" if match else out.strip().splitlines()[-1]


def compile_csrc(arches: list[str], csrc: Path = ROOT / "csrc") -> dict:
    """Compile `csrc`/*.cu for `arches` and its *.cpp (syntax only); records or CheckError."""
    nvcc, origin = find_nvcc()
    host = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    out: dict = {
        "nvcc": _rel(Path(nvcc)),
        "nvcc_from": origin,
        "nvcc_version": _version(nvcc),
        "files": [],
    }
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        flags = _torch_flags(tmp, csrc)
        for source in sorted(csrc.glob("*.cu")):
            cmd = [nvcc, "-c", "-std=c++20", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings",
                   "-Xcompiler", "-Wall,-Werror", *(ARCHES[a] for a in arches), *flags,
                   str(source), "-o", str(tmp / (source.stem + ".o"))]  # fmt: skip
            start = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True)
            log = result.stdout + result.stderr
            if result.returncode != 0:
                error = next((x for x in log.splitlines() if "error" in x), log.strip()[-300:])
                raise CheckError(f"{_rel(source)}: nvcc failed: {error.strip()}")
            threads = _block_threads(source)
            kernels = []
            for entry in parse_ptxas(log):
                entry["demangled"] = _demangle(entry["function"])
                # Dynamic shared memory, at most one 8-byte accumulator per thread (segment_sum).
                dynamic = 8 * threads if "segment_sum_kernel" in entry["demangled"] else 0
                entry["shared_bytes"] = entry["static_smem"] + dynamic
                entry["threads"] = threads
                entry["occupancy_h100"] = (
                    occupancy(entry["registers"], entry["shared_bytes"], threads // 32)
                    if entry["arch"].startswith("sm_90")
                    else None
                )
                kernels.append(entry)
            out["files"].append(
                {"file": f"{_rel(source)}", "arches": arches, "kernels": kernels,
                 "compile_s": round(time.perf_counter() - start, 1)}
            )  # fmt: skip
        for source in sorted(csrc.glob("*.cpp")):
            if host is None:
                raise CheckError("csrc: no host C++ compiler (c++/g++) for the .cpp files")
            cmd = [host, "-fsyntax-only", "-std=c++20", "-Wall", "-Werror", *flags, str(source)]
            start = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                log = result.stderr
                error = next((x for x in log.splitlines() if "error" in x), log.strip()[-300:])
                raise CheckError(f"{_rel(source)}: {Path(host).name} failed: {error.strip()}")
            out["files"].append(
                {"file": f"{_rel(source)}", "compiler": host,
                 "compile_s": round(time.perf_counter() - start, 1)}
            )  # fmt: skip
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _block_threads(source: Path) -> int:
    """Threads per block of the file's launches (its `kThreads`)."""
    match = re.search(r"constexpr int kThreads = (\d+);", source.read_text())
    if match is None:
        raise CheckError(f"{_rel(source)}: no `constexpr int kThreads = N;` block size")
    return int(match.group(1))


def _demangle(symbol: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return symbol
    return subprocess.run([tool, symbol], capture_output=True, text=True).stdout.strip() or symbol


def csrc_failures(csrc: dict, allowed: dict[str, str]) -> list[str]:
    failures = []
    for f in csrc["files"]:
        for k in f.get("kernels", []):
            config_id = f"csrc.{k['demangled']}:{k['arch']}"
            if k["shared_bytes"] > H100["smem_per_block"]:
                failures.append(f"{config_id}: {k['shared_bytes']} bytes of shared memory")
            if (k["spill_stores"] or k["spill_loads"]) and spill_reason(config_id, allowed) is None:
                failures.append(
                    f"{config_id}: spills {k['spill_stores']}/{k['spill_loads']} bytes, "
                    "not in the spill allowlist of bench/NOTES.md"
                )
    return failures


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def versions() -> dict:
    import torch
    import triton
    from harness import device_name

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ptxas": _rel(Path(_ptxas_path())),
        "host": f"{device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs, no GPU",
    }


def run(args) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise CheckError("TRITON_INTERPRET=1 is set: kernels would be interpreted, not compiled")
    package = load_kernels(Path(args.triton_dir))
    plan = [c for c in triton_plan(package) if not args.only or any(s in c.id for s in args.only)]
    if not plan and not args.skip_triton:
        raise CheckError(f"no Triton configuration matches --only {args.only}")
    allowed = spill_allowlist(Path(args.notes))
    start = time.perf_counter()
    records = []
    if not args.skip_triton:
        for i, cfg in enumerate(plan, 1):
            rec = compile_triton(cfg)
            records.append(rec)
            print(
                f"[{i:2d}/{len(plan)}] {rec['id']}: {rec['registers']} regs, "
                f"{rec['spill_stores'] + rec['spill_loads']} B spilled, "
                f"{rec['shared_bytes']} B smem, occupancy {rec['occupancy_h100']['fraction']:.0%}",
                flush=True,
            )
    triton_s = time.perf_counter() - start
    csrc = None if args.skip_csrc else compile_csrc(args.arches, Path(args.csrc_dir))
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "target": "sm_90 (Triton: GPUTarget('cuda', 90, 32)); csrc: " + ", ".join(args.arches),
        "versions": versions(),
        "h100_limits": H100,
        "shapes": {"logits": LOGITS_SHAPE, "fused_linear": FUSED_SHAPE, "policy_loss": LOSS_SHAPE},
        "triton": records,
        "triton_s": round(triton_s, 1),
        "csrc": csrc,
        "spill_allowlist": allowed,
    }
    failures = limit_failures(records, allowed)
    if csrc is not None:
        failures += csrc_failures(csrc, allowed)
    report["failures"] = failures
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report ('' for none)")
    parser.add_argument("--triton-dir", default=str(ROOT / "triton_kernels"))
    parser.add_argument("--csrc-dir", default=str(ROOT / "csrc"))
    parser.add_argument("--notes", default=str(NOTES), help="file with the spill allowlist")
    parser.add_argument("--only", nargs="*", default=[], help="configs whose id contains one")
    parser.add_argument("--arches", nargs="+", default=list(ARCHES), choices=list(ARCHES))
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-csrc", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        report = run(args)
    except CheckError as error:
        print(f"{FAIL_PREFIX}: {error}", flush=True)
        return 1
    report["total_s"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    n_kernels = sum(len(f.get("kernels", [])) for f in (report["csrc"] or {}).get("files", []))
    summary = (
        f"{len(report['triton'])} Triton configs, {n_kernels} csrc kernel entries, "
        f"{report['total_s']} s"
    )
    if report["failures"]:
        print(f"{FAIL_PREFIX}: {report['failures'][0]} ({len(report['failures'])} failures)")
        for line in report["failures"][1:]:
            print(f"  also: {line}")
        return 1
    print(f"cuda-check: ok: {summary}" + (f"; wrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
