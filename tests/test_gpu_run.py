"""`bench/gpu_run.py`, the prepared GPU run: its dry run on the CPU plans every part and checks
the shapes, the benchmark flags and the step benchmark's plan; nothing is built or timed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_run  # noqa: E402


def test_dry_run_plans_every_part():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for part in gpu_run.PARTS:
        assert f"[{part}]" in out
    assert "setup.py build_ext --inplace" in out
    assert "pytest -m gpu" in out and "tests/test_policy_loss.py" in out
    assert "--n 32768 --v 160000" in out and "--m 16384 --h 4096 --v 131072" in out
    assert "--b 512 --t 4096" in out
    # The step benchmark planned its Qwen2.5-1.5B-shaped model and micro-batches.
    assert "1.54 B parameters" in out and "micro-batches" in out
    assert out.strip().endswith("dry run: ok")


def test_parts_keep_their_order_and_unknown_parts_fail():
    assert gpu_run.parse_parts("step,build") == ["build", "step"]
    with pytest.raises(Exception, match="unknown parts"):
        gpu_run.parse_parts("build,warmup")


def test_dry_run_finds_a_flag_the_script_lacks_and_a_shape_too_large(monkeypatch, capsys):
    commands = gpu_run.plan(Path("out.json"))
    assert gpu_run.dry_run(["kernels"], 80.0, gpu_run.Log(None)) == 0
    # bench_logprobs at N=32768, V=160000 needs more than a 16 GiB card holds.
    assert gpu_run.dry_run(["kernels"], 16.0, gpu_run.Log(None)) == 1
    assert "bench_logprobs: needs about" in capsys.readouterr().out

    bad = commands["kernels"][0]
    bad.argv = [*bad.argv, "--no-such-flag", "1"]
    monkeypatch.setattr(gpu_run, "plan", lambda out: {**commands, "kernels": [bad]})
    assert gpu_run.dry_run(["kernels"], 80.0, gpu_run.Log(None)) == 1
    assert "bench_logprobs.py has no --no-such-flag option" in capsys.readouterr().out

    bad.argv = gpu_run.bench("bench_fused_linear.py", "--providers naive nope", Path("o.json"))
    assert gpu_run.dry_run(["kernels"], 80.0, gpu_run.Log(None)) == 1
    assert "has no provider nope" in capsys.readouterr().out
