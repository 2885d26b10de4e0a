"""Models and tokenizers: built-in tiny Qwen2-style presets or any local Hugging Face causal LM.

A preset is materialised once into a cache directory: a byte-level BPE tokenizer trained on a
corpus the caller provides (the environment's own text), with Qwen2.5's control tokens and chat
template, plus a randomly initialised `Qwen2ForCausalLM`. Both are written with `save_pretrained`,
so the directory loads with `AutoModelForCausalLM` and `load_tokenizer` (and vLLM, which is given
token ids) and nothing is ever fetched from a hub.

    model, tokenizer, path = load_model("tiny", corpus=env.corpus, cache_dir="~/.cache/fastrl")
    model, tokenizer, path = load_model("/models/Qwen2.5-0.5B-Instruct")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

log = logging.getLogger(__name__)

__all__ = [
    "BASES",
    "CHAT_TEMPLATE",
    "OPEN_JSON",
    "PRESETS",
    "PRESET_FORMAT_VERSION",
    "SPECIAL_TOKENS",
    "ModelPreset",
    "apply_liger",
    "build_tokenizer",
    "control_token_ids",
    "count_parameters",
    "init_model",
    "load_model",
    "materialize_preset",
]

# Bump when anything that changes a materialised preset changes (tokenizer recipe, template,
# config fields, init), so stale cache directories are never reused.
PRESET_FORMAT_VERSION = 7

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
# Fixed ids 0..8, in this order, for every tokenizer built here.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    "<|im_start|>",
    EOS_TOKEN,
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<tools>",
    "</tools>",
)
# The pre-tokenizer split. Unlike Qwen2's, a word never carries the character before it and a
# number stays whole: "Mia" is the same token in `Where does Mia live?` and in `{"name": "Mia"}`,
# and "745" the same in a tool result and in the call that uses it. A JSON key keeps its closing
# quote, colon and the value's opening quote (`city": "`), so a value directly follows the key that
# names it, in tool results and in calls alike. Copying an entity from the context is then a copy
# of identical tokens right after identical tokens, which a small model learns far sooner.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}_]+\": ?\"?|[\p{L}_]+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The JSON opener the collapse monitor probes right after "<tool_call>\n"; kept a single token.
OPEN_JSON = '{"'

# Qwen2.5's layout without its tool-schema system block and without a default system message:
# consecutive "tool" messages become one user turn of <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_COMPLETE_MARKER = "fastrl_preset.json"


# --- presets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a tiny random-init Qwen2 model.

    Attributes:
        hidden: model width.
        heads: query heads; `hidden // heads` must be 64 (vLLM's CPU attention needs it).
        kv_heads: key/value heads (grouped-query attention).
        layers: decoder layers.
        intermediate: SwiGLU MLP width.
        vocab_size: default target size of the BPE vocabulary trained for the preset; the
            embedding holds the tokenizer's length rounded up to a multiple of 64.
    """

    hidden: int
    heads: int
    kv_heads: int
    layers: int
    intermediate: int
    vocab_size: int = 2048

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads must divide hidden and kv_heads must divide heads: {self}")

    @property
    def head_dim(self) -> int:
        """Per-head width of the attention."""
        return self.hidden // self.heads


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(hidden=256, heads=4, kv_heads=2, layers=2, intermediate=768),
    "small": ModelPreset(hidden=384, heads=6, kv_heads=2, layers=4, intermediate=1024),
    "base": ModelPreset(hidden=512, heads=8, kv_heads=4, layers=6, intermediate=1536),
}
# Tool-use pretrained bases: `<preset>-base` is the preset after `fastrl pretrain`
# (fastrl/pretrain.py builds and caches it on first use).
BASES: dict[str, str] = {f"{name}-base": name for name in PRESETS}


# --- tokenizer ----------------------------------------------------------------------------------


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen2.5's control tokens and chat template.

    The pipeline is an NFC normaliser, the `PRETOKENIZE_REGEX` split and byte-level BPE, so any text
    encodes (the 256 byte symbols are in the initial alphabet) and `decode(encode(s)) == s` for
    NFC text; decoding adds and strips nothing. Ids 0..8 are `SPECIAL_TOKENS` in order; `{"` is
    an ordinary (non-special) added token, so it is always one token. The result is
    deterministic for the same `texts`.

    Args:
        texts: training text.
        vocab_size: target vocabulary size, special tokens and byte alphabet included (the
            `{"` token comes on top). Must exceed 265 (9 special tokens + 256 bytes).
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size <= min_size:
        raise ValueError(f"vocab_size must be larger than {min_size}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat roles are text inside the template's frame; seeing them keeps each one token.
    roles = ["system\nuser\nassistant\n"] * 64
    backend.train_from_iterator(itertools.chain(texts, roles), trainer=trainer)
    backend.add_tokens([OPEN_JSON])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def control_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the tokens the monitor probes: `open_json`, `im_end`, `tool_call`, `end_tool_call`.

    Raises:
        ValueError: if one of them is not a single token in `tokenizer`.
    """
    texts = {
        "open_json": OPEN_JSON,
        "im_end": EOS_TOKEN,
        "tool_call": "<tool_call>",
        "end_tool_call": "</tool_call>",
    }
    ids = {}
    for key, text in texts.items():
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"{text!r} is not a single token for this tokenizer: {encoded}")
        ids[key] = encoded[0]
    return ids


# --- model --------------------------------------------------------------------------------------


def _qwen2_config(preset: ModelPreset, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """Qwen2 config for `preset` with an embedding sized to `tokenizer`."""
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    return Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=pad_id,
    )


def _corpus_digest(texts: Iterable[str]) -> str:
    """sha256 of the corpus, length-prefixed per text so boundaries count."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _is_complete(path: Path) -> bool:
    """Whether `path` is a finished preset directory (the marker is written last)."""
    return (path / _COMPLETE_MARKER).is_file()


PREVIOUS_TOKEN_BIAS = 6.0


@torch.no_grad()
def init_previous_token_head(model: Qwen2ForCausalLM, scale: float = PREVIOUS_TOKEN_BIAS) -> None:
    """Start query head 0 of the first layer as a previous-token head.

    Copying a value from the context (the city a tool returned, into the next call) needs a head
    that looks at the previous token and a later head that matches on what it found. From a random
    start a small model forms that pair late (a plateau, then a sudden drop in loss); giving it the
    first half through the q/k biases removes most of the plateau. With RoPE, constant q and k
    give a score of sum_i |q_i||k_i| cos(delta * theta_i + arg q_i - arg k_i) at distance delta;
    rotating each query pair by -theta_i makes every frequency peak at delta = 1. The biases are
    ordinary parameters: training may keep or undo them.
    """
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    half = head_dim // 2
    base = model.config.rope_parameters["rope_theta"]
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)  # [D/2]
    q = torch.cat([scale * torch.cos(theta), -scale * torch.sin(theta)])  # [D]
    k = torch.cat([torch.full((half,), scale, dtype=torch.float64), torch.zeros(half)])  # [D]
    attn.q_proj.bias[:head_dim] = q.to(attn.q_proj.bias.dtype)
    attn.k_proj.bias[:head_dim] = k.to(attn.k_proj.bias.dtype)


COPY_HEAD_GAIN = 4.0


@torch.no_grad()
def init_copy_head(model: Qwen2ForCausalLM, gain: float = COPY_HEAD_GAIN, seed: int = 1) -> None:
    """Start the last query head of the last layer with a copying output circuit.

    Writing a name or city from the user's question into a call needs a head that attends to the
    value and writes it to the output. Attention only learns where to look once the head's output
    raises the right logit, and the output only learns to copy once attention looks there: from
    a random start, that takes a tiny model hundreds of steps to break. With tied embeddings, an
    OV circuit proportional to a projection copies: the value projection of the head's key/value
    group is set to D orthonormal rows R and the head's output columns to `gain` R^T, so its
    output for an attended token t is `gain` * P e_t, whose logit is highest for t itself. The
    attention pattern is left random, and training may keep or undo the circuit.

    Leaving the plateau is still stochastic: with this basis (seed 1, fp32 normal draws) the demo's
    SFT reached loss 0.27-0.30 by step 400; with a basis drawn in float64 from the same seed it was
    still at 0.46-0.60 (gain 4 and 8). Both measured in the tool world before its number ranges
    shrank.
    """
    attn = model.model.layers[-1].self_attn
    d = attn.head_dim
    head = model.config.num_attention_heads - 1
    group = head // (model.config.num_attention_heads // model.config.num_key_value_heads)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(model.config.hidden_size, d, generator=generator)  # [H, D] fp32
    rows = torch.linalg.qr(basis)[0].T  # [D, H], orthonormal rows
    attn.v_proj.weight[group * d : (group + 1) * d] = rows.to(attn.v_proj.weight.dtype)
    attn.o_proj.weight[:, head * d : (head + 1) * d] = (gain * rows.T).to(attn.o_proj.weight.dtype)


def init_model(
    preset: ModelPreset, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Qwen2ForCausalLM:
    """The random-init model of `preset` for `tokenizer`, with its previous-token and copy heads;
    the global RNG is left as it was."""
    config = _qwen2_config(preset, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    init_previous_token_head(model)
    init_copy_head(model)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


def materialize_preset(
    name: str,
    corpus: Callable[[], Iterable[str]],
    cache_dir: str | Path,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Build (once) and save the tokenizer and random-init model of a preset; return its directory.

    The directory is `cache_dir/<name>-vocab<V>-seed<S>-v<version>-<hash>`, the hash covering the
    corpus text and the preset's shape. An existing complete directory is returned untouched.
    A build is written to a temporary directory and renamed into place, so a killed build leaves
    no partial directory and concurrent builders (e.g. several ranks) agree on one result.

    Args:
        name: a key of `PRESETS`.
        corpus: returns the tokenizer's training text; called once to hash, again to train.
        cache_dir: where preset directories live.
        vocab_size: BPE target size; defaults to the preset's `vocab_size` (2048).
        seed: seed of the weight initialisation.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    vocab_size = preset.vocab_size if vocab_size is None else vocab_size
    key = hashlib.sha256(json.dumps(asdict(preset), sort_keys=True).encode())
    key.update(_corpus_digest(corpus()).encode())
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / (
        f"{name}-vocab{vocab_size}-seed{seed}-v{PRESET_FORMAT_VERSION}-{key.hexdigest()[:16]}"
    )
    if _is_complete(final):
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        tokenizer = build_tokenizer(corpus(), vocab_size=vocab_size)
        model = init_model(preset, tokenizer, seed)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        marker = {"preset": name, **asdict(preset), "vocab_size": vocab_size, "seed": seed}
        marker["format_version"] = PRESET_FORMAT_VERSION
        (staging / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)
        try:
            os.replace(staging, final)
        except OSError:
            # Another builder renamed its identical result into place first.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_model(
    path_or_preset: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    corpus: Callable[[], Iterable[str]] | None = None,
    cache_dir: str | Path | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load a causal LM and its tokenizer from a preset name or a local directory.

    A preset is materialised first (see `materialize_preset`; needs `corpus` and `cache_dir`).
    A directory must hold a `config.json`; it is read with `local_files_only=True`.
    The model comes back in eval mode: the caller decides when to train.

    Returns:
        (model, tokenizer, model_dir).
    """
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        if corpus is None or cache_dir is None:
            raise ValueError(
                f"preset {path_or_preset!r} is built on first use and needs both `corpus` "
                "(a callable returning the tokenizer's training text) and `cache_dir`"
            )
        model_dir = materialize_preset(
            path_or_preset, corpus, cache_dir, vocab_size=vocab_size, seed=seed
        )
    else:
        model_dir = Path(path_or_preset).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"model path {str(model_dir)!r} is not an existing directory "
                f"(nor a preset: {', '.join(PRESETS)}); models are only loaded from local files"
            )
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        local_files_only=True,
        attn_implementation=attn_implementation,
    )
    model.eval()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer, model_dir


LIGER_PATCHES = ("rope", "rms_norm", "swiglu")


def apply_liger(
    model: PreTrainedModel, *, patches: Iterable[str] = LIGER_PATCHES, allow_cpu: bool = False
) -> list[str]:
    """Swap in liger-kernel's RoPE, RMSNorm and SwiGLU MLP kernels; returns what was patched.

    Liger's cross-entropy and fused-linear-cross-entropy are left off: training never calls the
    model's own LM head (fastrl's fused logprob op reads the hidden states), and generation keeps
    the plain head. The kernels are Triton: on CPU tensors they run only under
    `TRITON_INTERPRET=1`, so CPU use is refused unless `allow_cpu` (tests). Liger patches the
    architecture's module functions (RoPE) for every model of that type in the process.
    """
    device = next(model.parameters()).device
    if device.type != "cuda" and not allow_cpu:
        raise ValueError(
            "model.liger: liger-kernel's kernels are Triton GPU kernels and this model is on "
            f"{device.type}; set model.liger=false (or train on a CUDA device)"
        )
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError as e:
        raise ImportError(
            "model.liger needs liger-kernel: pip install 'liger-kernel' (or set model.liger=false)"
        ) from e
    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(
            f"model.liger: liger-kernel has no kernels for model type {model_type!r}; "
            "set model.liger=false"
        )
    patched = [name for name in LIGER_PATCHES if name in set(patches)]
    _apply_liger_kernel_to_instance(
        model,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        **{name: name in patched for name in LIGER_PATCHES},
    )
    log.info("liger-kernel patches on %s (%s): %s", model_type, device.type, ", ".join(patched))
    return patched


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory, exactly as its `tokenizer.json` defines it.

    `AutoTokenizer` may rebuild a model family's own pipeline around the saved vocabulary (it does
    for `qwen2` directories), which would change how the presets' tokenizers split text; reading
    `tokenizer.json` directly keeps encodings identical to the ones trained with.
    """
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
