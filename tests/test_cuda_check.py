"""`bench/cuda_check.py` (`make cuda-check`): its arithmetic, its allowlist, and that it fails.

The full check (every configuration, csrc for two arches) takes minutes and runs from `make test`
after pytest. Here: the occupancy and limit rules on known numbers, the ptxas log parser, and
real compiles that must fail — a broken copy of a Triton kernel, and CUDA sources with a warning
and with too much shared memory — next to the same compiles that pass, so a failure is the
break's and not the set-up's.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cuda_check  # noqa: E402

# One backward configuration of the token-statistics kernels (a single compile).
BWD_BF16 = (
    "_token_stats_bwd_kernel:bf16+fp32+i64[BLOCK_V=4096,HAS_GRAD_ENTROPY=1,HAS_GRAD_LOGPROBS=1]"
)


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cuda_check.py"), "--out", "", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def fail_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [x for x in result.stdout.splitlines() if x.startswith(cuda_check.FAIL_PREFIX)]


def test_occupancy_on_h100_limits():
    # 32 registers x 256 threads: 8 blocks of 8 warps fill the 64 warps.
    assert cuda_check.occupancy(32, 0, 8) == {
        "blocks_per_sm": 8,
        "warps_per_sm": 64,
        "fraction": 1.0,
        "limited_by": "registers",
    }
    # 37 registers round up to 40 per thread (1280 per warp): 6 blocks of 8 warps.
    assert cuda_check.occupancy(37, 32, 8)["blocks_per_sm"] == 6
    # 255 registers x 8 warps: one block, an eighth of the warps.
    assert cuda_check.occupancy(255, 0, 8)["fraction"] == 0.125
    # 100 KiB of shared memory (+ 1 KiB reserved) per block: two blocks per 228 KiB SM.
    occ = cuda_check.occupancy(16, 100 * 1024, 4)
    assert occ["blocks_per_sm"] == 2 and occ["limited_by"] == "shared"
    # Tiny blocks hit the 32 blocks per SM limit.
    assert cuda_check.occupancy(16, 0, 1)["blocks_per_sm"] == 32


def test_ptxas_log_is_parsed():
    log = """ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_80'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 380 bytes cmem[0]
"""
    k1, k2 = cuda_check.parse_ptxas(log)
    assert k1 == {
        "function": "k1",
        "arch": "sm_90a",
        "registers": 255,
        "stack_frame": 16,
        "spill_stores": 8,
        "spill_loads": 12,
        "static_smem": 2048,
    }
    assert (k2["arch"], k2["registers"], k2["spill_stores"], k2["static_smem"]) == (
        "sm_80",
        30,
        0,
        0,
    )


def test_spills_need_an_entry_in_the_allowlist_and_smem_a_limit(tmp_path):
    notes = tmp_path / "NOTES.md"
    notes.write_text(
        "# Notes\n\n## Spill allowlist\n\n"
        "    - `example.k:fp32[*]w8`: an indented example, not an entry\n"
        "- `policy_loss.rows:fp64+u8[*]w8`: fp64 accumulators, measured harmless\n\n"
        "## Other\n- `other.k:*`: outside the section\n"
    )
    allowed = cuda_check.spill_allowlist(notes)
    assert allowed == {"policy_loss.rows:fp64+u8[*]w8": "fp64 accumulators, measured harmless"}

    def record(config_id, spills=0, smem=0):
        return {
            "id": config_id,
            "spill_stores": spills,
            "spill_loads": spills,
            "shared_bytes": smem,
        }

    ok = [record("policy_loss.rows:fp64+u8[ACC=fp64]w8", spills=64), record("a.k:bf16[]w8")]
    assert cuda_check.limit_failures(ok, allowed) == []
    (spill,) = cuda_check.limit_failures([record("other.k:fp32[]w8", spills=4)], allowed)
    assert "other.k:fp32[]w8" in spill and "allowlist" in spill
    (smem,) = cuda_check.limit_failures([record("a.k:bf16[]w8", smem=227 * 1024 + 1)], allowed)
    assert "shared memory" in smem and str(227 * 1024) in smem
    assert cuda_check.limit_failures([record("a.k:bf16[]w8", smem=227 * 1024)], allowed) == []


def test_the_plan_follows_the_launchers():
    """Block sizes and warps come from the launchers' helpers at the benchmark shapes."""

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """
import sys
from pathlib import Path
sys.path.insert(0, "bench")
import cuda_check as c
plan = c.triton_plan(c.load_kernels(Path("triton_kernels")))
print(len(plan))
print(sorted({(p.name, p.num_warps) for p in plan}))
print(sorted({v for p in plan for k, v in p.constexprs.items() if k.startswith("BLOCK_")}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    count, warps, blocks = result.stdout.strip().splitlines()
    # 3 dtypes x (4 forward + 3 backward), and 3 input dtypes x (8 rows + 2 finalize).
    assert int(count) == 3 * 7 + 3 * 10
    assert "('logprobs._token_stats_fwd_kernel', 8)" in warps
    assert "('policy_loss._policy_loss_finalize_kernel', 4)" in warps
    # BLOCK_V 4096 at both vocabularies, BLOCK_T 1024/512 (fp32/fp64), BLOCK_B 512 at B=512.
    assert all(str(b) in blocks for b in (4096, 1024, 512))


def test_a_broken_triton_kernel_fails_the_check(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="no CUDA backend in triton")
    kernels = tmp_path / "kernels"
    shutil.copytree(ROOT / "triton_kernels", kernels)
    ok = run_check("--triton-dir", str(kernels), "--skip-csrc", "--only", BWD_BF16)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "cuda-check: ok: 1 Triton configs" in ok.stdout

    # A shape error: a (BLOCK_V,) gradient plus a (BLOCK_V // 2,) vector does not compile.
    source = kernels / "logprobs.py"
    text = source.read_text()
    line = "        grad = tl.where(valid, grad * inv_temp, 0.0)\n"
    assert line in text
    broken = line.replace("0.0)", "0.0) + tl.zeros([BLOCK_V // 2], tl.float32)")
    source.write_text(text.replace(line, broken))
    result = run_check("--triton-dir", str(kernels), "--skip-csrc", "--only", BWD_BF16)
    assert result.returncode == 1
    (line,) = fail_lines(result)
    assert "_token_stats_bwd_kernel" in line and "compile error" in line


CU_SOURCE = r"""
constexpr int kThreads = 128;

__global__ void scale_kernel(float* out, const float* in, float a, long n) {
  __shared__ float tile[SHARED_FLOATS];
  long i = blockIdx.x * static_cast<long>(kThreads) + threadIdx.x;
  tile[threadIdx.x % SHARED_FLOATS] = i < n ? in[i] : 0.0f;
  __syncthreads();
  if (i < n) out[i] = a * tile[(threadIdx.x + 1) % SHARED_FLOATS];
  EXTRA
}
"""


@pytest.mark.parametrize(
    "floats, extra, expected",
    [
        (256, "", None),
        (256, "int unused = 3;", "nvcc failed"),  # a warning is an error
        (64 * 1024, "", "nvcc failed"),  # 256 KiB of static shared memory: ptxas refuses it
    ],
    ids=["clean", "warning", "too-much-shared-memory"],
)
def test_cuda_sources_fail_on_warnings_and_limits(tmp_path, floats, extra, expected):
    try:
        cuda_check.find_nvcc()
    except cuda_check.CheckError as error:
        pytest.skip(str(error))
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    text = CU_SOURCE.replace("SHARED_FLOATS", str(floats)).replace("EXTRA", extra)
    (csrc / "scale.cu").write_text(text)
    result = run_check("--skip-triton", "--csrc-dir", str(csrc), "--arches", "sm_90a")
    if expected is None:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "1 csrc kernel entries" in result.stdout
    else:
        assert result.returncode == 1
        (line,) = fail_lines(result)
        assert "scale.cu" in line and expected in line
