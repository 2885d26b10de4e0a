"""The liger-kernel switch: refused on CPU at start, and composing with packing and the fused head.

Liger's kernels are Triton; without a GPU they run here under Triton's interpreter (forced with
`allow_cpu`), in a subprocess because liger patches transformers' Qwen2 module functions for the
whole process. Liger's RMSNorm and SwiGLU kernels call `.to()` on values the interpreter passes
as Python scalars, so on CPU the check covers RoPE only; on a GPU it covers all three.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastrl.config import ConfigError, load_config

pytest.importorskip("liger_kernel")


def test_liger_on_cpu_is_refused_at_start_with_the_key_named(tmp_path):
    from fastrl.train.trainer import train

    cfg = load_config(None, ["model.liger=true", f"run_dir={tmp_path}", "sft.steps=1"])
    with pytest.raises(ConfigError, match="model.liger"):
        train(cfg)


SCRIPT = textwrap.dedent(
    """
    import copy, json, sys, torch
    from fastrl.envs import get_world
    from fastrl.models import apply_liger, load_model
    from fastrl.rollout.loop import Limits
    from fastrl.train import packing
    from fastrl.algo import supervision as S
    from fastrl.train import batch as B

    world = get_world("synthetic")
    model, tok, _ = load_model("tiny", corpus=lambda: world.tokenizer_corpus(n_tasks=300),
                               cache_dir=sys.argv[1], vocab_size=512)
    model.config._attn_implementation = packing.register()
    tasks, limits = world.tasks("test", 3), Limits(max_total_tokens=4096)
    trajs = S.play_experts(tok, world, tasks, limits, solved_only=True)
    batch = B.collate(trajs, tok.pad_token_id)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        model.cuda()
    with torch.no_grad():  # before patching: liger's RoPE replaces a module function
        plain, _, _ = B.token_stats(model, batch, packed=True)
    patched_model = copy.deepcopy(model)
    patches = ["rope", "rms_norm", "swiglu"] if on_gpu else ["rope"]
    patched = apply_liger(patched_model, patches=patches, allow_cpu=True)
    kinds = sorted({type(m).__name__ for m in patched_model.modules()})
    from transformers.models.qwen2 import modeling_qwen2
    liger_rope = modeling_qwen2.apply_rotary_pos_emb
    calls = []
    def counted(*args, **kwargs):
        calls.append(1)
        return liger_rope(*args, **kwargs)
    modeling_qwen2.apply_rotary_pos_emb = counted
    with torch.no_grad():
        liger, _, _ = B.token_stats(patched_model, batch, packed=True)
    rope_patched = "liger" in liger_rope.__module__ and len(calls) > 0
    mask = batch.target_mask
    print(json.dumps({
        "patched": patched, "kinds": kinds, "on_gpu": on_gpu, "rope_patched": rope_patched,
        "max_diff": (plain[mask] - liger[mask]).abs().max().item(),
        "mean_lp": plain[mask].mean().item(),
    }))
    """
)


def test_liger_patches_compose_with_packing_and_the_fused_head(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gpu = result["on_gpu"]
    assert result["patched"] == (["rope", "rms_norm", "swiglu"] if gpu else ["rope"])
    assert result["rope_patched"]
    assert ("LigerRMSNorm" in result["kinds"]) == gpu
    assert ("LigerSwiGLUMLP" in result["kinds"]) == gpu
    assert result["mean_lp"] < -0.1  # a random-init model: the logprobs are not trivial
    assert result["max_diff"] < 1e-3
