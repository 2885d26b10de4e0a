import os

import pytest

# Tests run on the CPU; keep the thread count modest so parallel CI machines are not oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Without a GPU the Triton kernels run (in tests only) under Triton's interpreter, which must be
# chosen before any kernel is defined. Forced-backend tests opt in with FASTRL_BACKEND=triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def fastrl_cache(tmp_path_factory):
    """Presets built by runs that do not set model.cache_dir, and bench results, go to a temporary
    cache (FASTRL_CACHE, inherited by subprocesses), never the user's ~/.cache/fastrl."""
    path = tmp_path_factory.mktemp("fastrl-cache")
    old = os.environ.get("FASTRL_CACHE")
    os.environ["FASTRL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FASTRL_CACHE", None)
    else:
        os.environ["FASTRL_CACHE"] = old


@pytest.fixture(scope="session")
def world():
    from fastrl.envs import get_world

    return get_world("synthetic")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, world):
    """The tiny preset with a small tool-world tokenizer: (model, tokenizer, dir)."""
    from fastrl.models import load_model

    cache = tmp_path_factory.mktemp("models")
    return load_model(
        "tiny", corpus=lambda: world.tokenizer_corpus(n_tasks=300), cache_dir=cache, vocab_size=512
    )
