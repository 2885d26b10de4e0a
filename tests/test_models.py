"""Tests for fastrl.models: tokenizer, chat template, presets, caching and loading."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastrl import models
from fastrl.models import (
    CHAT_TEMPLATE,
    PRESETS,
    SPECIAL_TOKENS,
    build_tokenizer,
    control_token_ids,
    count_parameters,
    load_model,
    materialize_preset,
)

VOCAB = 512


def corpus() -> list[str]:
    """A few hundred made-up lines of tool-call-like chat text."""
    rng = random.Random(0)
    tools = ["get_weather", "book_flight", "search_files", "send_email", "convert_units"]
    cities = ["Paris", "Tokyo", "Zürich", "São Paulo", "Oslo"]
    lines = []
    for i in range(300):
        call = {"name": rng.choice(tools), "arguments": {"city": rng.choice(cities), "n": i}}
        lines.append(f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>")
        lines.append(f'<tool_response>\n{{"status": "ok", "value": {rng.random():.3f}}}\n')
        lines.append(f"The forecast for {rng.choice(cities)} is {rng.randint(-5, 35)} degrees.")
    return lines


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus(), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preset_cache")


@pytest.fixture(scope="module")
def tiny_dir(cache_dir) -> Path:
    return materialize_preset("tiny", corpus, cache_dir, vocab_size=VOCAB)


# --- tokenizer ----------------------------------------------------------------------------------


def test_special_tokens_have_fixed_ids_and_are_single_tokens(tokenizer):
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected_id
        assert tokenizer.encode(token) == [expected_id]
        assert tokenizer.decode([expected_id], skip_special_tokens=False) == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"
    assert tokenizer.clean_up_tokenization_spaces is False


def test_open_json_is_one_token_after_tool_call(tokenizer):
    ids = control_token_ids(tokenizer)
    assert ids["im_end"] == 2 and ids["tool_call"] == 3 and ids["end_tool_call"] == 4
    assert tokenizer.encode('{"') == [ids["open_json"]]
    encoded = tokenizer.encode('<tool_call>\n{"name": "f"}')
    assert encoded[0] == ids["tool_call"]
    assert tokenizer.decode(encoded[1:2]) == "\n"
    assert encoded[2] == ids["open_json"]
    # Even where the BPE alone would merge differently, the opener stays one token.
    assert tokenizer.encode('x{"{"y').count(ids["open_json"]) == 2


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "plain words,  double  spaces\tand a tab\n\n\nand blank lines\r\n",
        "  leading and trailing spaces  ",
        "unicode: Zürich, São Paulo, 東京, emoji 🌦️, math ∑ x² ≤ 1",
        '{"nested": [1, 2.5e-3, null, true], "q": "say \\"hi\\""}',
        "<|im_start|>assistant\nunseen_identifier_42 (x) => y;<|im_end|>\n",
    ],
)
def test_decode_round_trips_text_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_vocab_size_below_alphabet_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=100)


def test_chat_template_matches_qwen25_layout(tokenizer):
    messages = [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Oslo and Paris?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>',
        },
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "tool", "content": '{"temp": 14}'},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Oslo is 3 degrees, Paris 14."},
    ]
    expected = (
        "<|im_start|>system\nYou can call tools.<|im_end|>\n"
        "<|im_start|>user\nWeather in Oslo and Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Oslo"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n"
        '{"temp": 3}\n</tool_response>\n<tool_response>\n{"temp": 14}\n</tool_response>'
        "<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\nOslo is 3 degrees, Paris 14.<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(
        messages[1:2], tokenize=False, add_generation_prompt=True
    )
    assert (
        prompt == "<|im_start|>user\nWeather in Oslo and Paris?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_is_deterministic():
    first = build_tokenizer(corpus(), vocab_size=VOCAB)
    second = build_tokenizer(corpus(), vocab_size=VOCAB)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_head_dim_64(name):
    preset = PRESETS[name]
    assert preset.head_dim == 64
    assert preset.hidden == preset.heads * 64
    assert preset.heads % preset.kv_heads == 0


def test_materialize_is_deterministic(tiny_dir, tmp_path):
    again = materialize_preset("tiny", corpus, tmp_path, vocab_size=VOCAB)
    assert again.name == tiny_dir.name
    first = load_file(tiny_dir / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tiny_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    other_seed = materialize_preset("tiny", corpus, tmp_path, vocab_size=VOCAB, seed=1)
    assert other_seed != again
    reseeded = load_file(other_seed / "model.safetensors")
    assert not torch.equal(
        first["model.embed_tokens.weight"], reseeded["model.embed_tokens.weight"]
    )


def test_materialize_reuses_cache_without_rebuilding(tiny_dir, cache_dir, monkeypatch):
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("cached preset was rebuilt")

    monkeypatch.setattr(models, "build_tokenizer", fail)
    assert materialize_preset("tiny", corpus, cache_dir, vocab_size=VOCAB) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # Another corpus is another key, so it does not hit the cached directory.
    with pytest.raises(AssertionError, match="rebuilt"):
        materialize_preset("tiny", lambda: corpus()[:-1], cache_dir, vocab_size=VOCAB)


def test_failed_build_leaves_no_directory(tmp_path, monkeypatch):
    def fail(config):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(models, "Qwen2ForCausalLM", fail)
    with pytest.raises(RuntimeError, match="killed"):
        materialize_preset("tiny", corpus, tmp_path, vocab_size=VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_saved_directory_loads_with_auto_classes(tiny_dir, tokenizer):
    loaded_tok = models.load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    assert model.generation_config.eos_token_id == loaded_tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == loaded_tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(loaded_tok)
    assert model.config.max_position_embeddings == 4096
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    assert loaded_tok.clean_up_tokenization_spaces is False
    assert control_token_ids(loaded_tok) == control_token_ids(tokenizer)
    text = '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert loaded_tok.encode(text) == tokenizer.encode(text)
    assert loaded_tok.decode(loaded_tok.encode(text), skip_special_tokens=False) == text


def test_load_model_from_preset_and_forward(tiny_dir, cache_dir):
    model, tok, path = load_model("tiny", corpus=corpus, cache_dir=cache_dir, vocab_size=VOCAB)
    assert path == tiny_dir
    assert not model.training
    batch = tok(["<|im_start|>user\nhi<|im_end|>\n", '<tool_call>\n{"name": "f"}'], padding=True)
    input_ids = torch.tensor(batch["input_ids"])  # [B, T]
    attention_mask = torch.tensor(batch["attention_mask"])  # [B, T]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    assert logits.shape == (*input_ids.shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_load_model_from_directory_with_options(tiny_dir):
    model, tok, path = load_model(str(tiny_dir), dtype=torch.bfloat16, gradient_checkpointing=True)
    assert path == tiny_dir
    assert model.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False
    assert tok.eos_token == "<|im_end|>"


def test_load_model_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(str(missing))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_load_model_preset_needs_corpus_and_cache_dir(tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        load_model("tiny", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cache_dir"):
        load_model("tiny", corpus=corpus)


def test_count_parameters_counts_tied_weights_once(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    preset, config = PRESETS["tiny"], model.config
    embed = config.vocab_size * preset.hidden
    attn = preset.hidden * preset.hidden * 2 + preset.hidden * 64 * preset.kv_heads * 2
    attn_bias = preset.hidden + 64 * preset.kv_heads * 2
    mlp = 3 * preset.hidden * preset.intermediate
    norms = 2 * preset.hidden
    expected = embed + preset.layers * (attn + attn_bias + mlp + norms) + preset.hidden
    assert count_parameters(model) == expected


def test_entities_are_the_same_tokens_in_text_and_json(tokenizer):
    def contains(seq, sub):
        return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    text = tokenizer.encode("Where does Mia live? Account A745.", add_special_tokens=False)
    call = tokenizer.encode('{"name": "Mia", "account": "A745"}', add_special_tokens=False)
    for word in ("Mia", "745"):
        tokens = tokenizer.encode(word, add_special_tokens=False)
        assert contains(text, tokens) and contains(call, tokens), word
    assert tokenizer.encode(" Mia", add_special_tokens=False)[1:] == tokenizer.encode(
        "Mia", add_special_tokens=False
    )


def test_first_layer_starts_with_a_previous_token_head(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, local_files_only=True, attn_implementation="eager"
    )
    x = torch.randint(20, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attn = model(input_ids=x, output_attentions=True).attentions[0][0, 0]  # [T, T]
    to_previous = torch.stack([attn[i, i - 1] for i in range(1, 48)])
    assert to_previous.mean() > 0.8
    other = model(input_ids=x, output_attentions=True).attentions[0][0, 1]
    assert torch.stack([other[i, i - 1] for i in range(1, 48)]).mean() < 0.5


def test_last_layer_starts_with_a_copying_head(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    attn = model.model.layers[-1].self_attn
    d, heads = attn.head_dim, model.config.num_attention_heads
    group = (heads - 1) // (heads // model.config.num_key_value_heads)
    with torch.no_grad():
        values = attn.v_proj.weight[group * d : (group + 1) * d]  # [D, H]
        ov = attn.o_proj.weight[:, (heads - 1) * d :] @ values  # [H, H]
        emb = model.get_input_embeddings().weight  # [V, H], tied with the LM head
        scores = emb @ ov @ emb.T  # [V, V]: logit of token i when the head attends to token j
    copies = (scores.argmax(0) == torch.arange(emb.shape[0])).float().mean()
    assert copies > 0.9
    # The other heads of that layer are random: they do not copy.
    with torch.no_grad():
        other = attn.o_proj.weight[:, :d] @ attn.v_proj.weight[:d]
        rand = ((emb @ other @ emb.T).argmax(0) == torch.arange(emb.shape[0])).float().mean()
    assert rand < 0.2


def test_presets_are_part_of_the_package_api():
    import fastrl
    from fastrl.models import PRESETS

    assert fastrl.PRESETS is PRESETS and "tiny" in fastrl.PRESETS
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fastrl.Nope  # noqa: B018
