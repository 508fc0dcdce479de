"""A dense index: corpus -> encoder -> embeddings + doc store + searcher, in one directory.

Layout of an index directory (`manifest.json` is written last, so a directory without one is incomplete):

    manifest.json        format version, encoder description, dim, backend, counts, corpus path/size/sha256
    embeddings.f32       float32 [rows, dim], raw row-major little-endian (np.memmap with the manifest's shape)
    docs.jsonl           the accepted corpus rows, in row order (itself a valid corpus)
    docs.offsets.npy     int64 [rows + 1] start of each row in docs.jsonl, plus the end sentinel
    scann/               the serialized ScaNN searcher (backend "scann" only)
    build_state.json     only while a build is unfinished: the checkpoint it resumes from

Resume: after each chunk of rows the build fsyncs the data files, then atomically rewrites build_state.json
(rows written, corpus offset reached, file lengths, sha256 of the corpus prefix consumed). A resumed build
cuts the data files back to the recorded lengths, replays the corpus reader over the already-indexed prefix
(so skip counts and the duplicate-id set are rebuilt exactly, with no encoding), checks that the prefix still
has the recorded sha256, and carries on. The corpus is hashed alongside reading, so the final sha256 costs
no extra pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rexrag_jax.jsonfile import is_within, read_json, write_json_atomic
from rexrag_jax.retrieval.corpus import (
    DOCS_FILE,
    SKIP_HINT,
    CorpusError,
    DocStore,
    DocStoreWriter,
    PrefixHasher,
    file_sha256,
    open_for_append,
    read_corpus,
)
from rexrag_jax.retrieval.searchers import (
    SCANN_MISSING,
    ExactSearcher,
    ScannSearcher,
    resolve_backend,
    scann_available,
    scann_params,
)
from rexrag_jax.retrieval.types import Hit
from rexrag_jax.untrusted import DEFAULT_LIMITS, TextLimits

FORMAT_VERSION = 1
# Rows per build checkpoint: MiniLM-L6 encodes ~29 passages/s of ~100 words on 2 CPU cores (the encoder
# benchmark in docs/benchmarks.md#retrieval), so a kill loses about 70 s of encoding; on an accelerator raise it
# (--checkpoint-rows) so that fsyncs stay rare.
CHECKPOINT_ROWS = 2048
MANIFEST, STATE, EMBEDDINGS, SCANN_DIR = "manifest.json", "build_state.json", "embeddings.f32", "scann"


class Index:
    """A loaded index: `search` encodes queries, finds neighbours and fetches their passages. Thread-safe
    (the doc store uses pread, the searchers are safe, and the encoder must be, as the real one is)."""

    def __init__(
        self, directory: str, manifest: dict, embeddings: np.ndarray, docs: DocStore, searcher: Any, encoder: Any
    ):
        self.directory, self.manifest, self.embeddings = directory, manifest, embeddings
        self.docs, self.searcher, self.encoder = docs, searcher, encoder

    @property
    def num_docs(self) -> int:
        return len(self.docs)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self.num_docs:
            raise ValueError(f"k must be an integer in 1..{self.num_docs} (the number of docs), got {k!r}")

    def search_embeddings(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores float32 [B, k], rows int64 [B, k])` for query embeddings `[B, dim]`, best first."""
        self._check_k(k)
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings must have shape [B, {self.dim}], got {list(queries.shape)}")
        if len(queries) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self.searcher.search(queries, int(k))

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The top-k passages for each query, best first; all queries are encoded in one call."""
        if isinstance(queries, str) or not isinstance(queries, list | tuple):
            raise ValueError(f"queries must be a list of strings, got {type(queries).__name__}")
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise ValueError(f"queries[{i}] must be a string, got {type(q).__name__}")
        self._check_k(k)
        if not queries:
            return []
        scores, rows = self.search_embeddings(self.encoder.encode(list(queries), kind="query"), k)
        return [
            [Hit(id=p.id, contents=p.contents, score=float(s)) for p, s in zip(self.docs.get_many(r), sc)]
            for r, sc in zip(rows, scores)
        ]

    def close(self) -> None:
        self.docs.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DAMAGED = "; the index is damaged, rebuild it"
_PRESET_KEYS = ("query_prefix", "passage_prefix", "max_length", "pooling", "normalize")


def _load_encoder(path: str, desc: dict | None = None) -> Any:
    """Load an encoder; with a stored description, with exactly the preset the index was built with."""
    from rexrag_jax.retrieval.encoder import EncoderPreset, load_encoder  # heavy: imported on use

    if desc is None or not all(k in desc for k in ("preset", *_PRESET_KEYS)):
        return load_encoder(path)
    return load_encoder(path, EncoderPreset(name=desc["preset"], **{k: desc[k] for k in _PRESET_KEYS}))


def _check_encoder_matches(encoder: Any, stored: dict, path: str) -> None:
    """Queries must be encoded the way passages were: same prefixes, truncation and pooling."""
    desc = _describe(encoder)
    diff = {k: (stored[k], desc.get(k)) for k in _PRESET_KEYS if k in stored and stored[k] != desc.get(k)}
    if diff:
        raise ValueError(
            f"encoder {desc.get('path')!r} does not match the one index {path} was built with: "
            + ", ".join(f"{k} {a!r} (index) vs {b!r}" for k, (a, b) in diff.items())
        )


def _describe(encoder: Any) -> dict:
    """The encoder description as stored (JSON round-tripped, its path absolute so loading works anywhere)."""
    desc = json.loads(json.dumps(encoder.describe()))
    if isinstance(desc.get("path"), str) and os.path.exists(desc["path"]):
        desc["path"] = os.path.abspath(desc["path"])
    return desc


def _encode_corpus(
    corpus: str, encoder: Any, out: str, state: dict, *, batch_size: int, chunk_rows: int, limits: TextLimits
) -> None:
    """Append embeddings + docs for the corpus rows not yet in `state`, checkpointing after each chunk.

    A checkpoint's `offset` is the end of the last row written, and `prefix_sha256` hashes the corpus up to
    there; a replay reaches exactly that point again after `rows` rows, where the two are checked.
    """
    dim, done = state["dim"], state["rows"]
    reader = read_corpus(corpus, skip_bad=state["skip_bad"], limits=limits)
    hasher = PrefixHasher(corpus)
    emb_file = open_for_append(os.path.join(out, EMBEDDINGS), done * dim * 4)
    docs = DocStoreWriter(out, rows=done, nbytes=state["docs_bytes"])
    bar = tqdm(total=state["corpus"]["size"], unit="B", unit_scale=True, desc="indexing", disable=None)

    def flush(chunk: list, row_end: int) -> None:
        if chunk:
            emb = np.asarray(
                encoder.encode([p.contents for p in chunk], kind="passage", batch_size=batch_size, progress=False),
                dtype=np.float32,
            )
            if emb.shape != (len(chunk), dim) or not np.isfinite(emb).all():
                raise ValueError(
                    f"encoder returned {list(emb.shape)} embeddings for {len(chunk)} passages "
                    f"(expected [{len(chunk)}, {dim}], all finite)"
                )
            emb_file.write(emb.astype("<f4").tobytes())
            docs.append(chunk)
            emb_file.flush()
            os.fsync(emb_file.fileno())
            docs.sync()
        state.update(
            rows=docs.rows,
            docs_bytes=docs.nbytes,
            offset=row_end,
            stats=reader.stats.to_dict(),
            prefix_sha256=hasher.to(row_end),
        )
        write_json_atomic(os.path.join(out, STATE), state)
        bar.update(reader.stats.offset - bar.n)

    try:
        chunk: list = []
        row_end = state["offset"]
        for _, passage in reader:
            row_end = reader.stats.offset
            if reader.stats.rows <= done:  # replaying rows indexed before the interruption: no encoding
                if reader.stats.rows == done:
                    _check_prefix(corpus, state, hasher.to(row_end) if row_end == state["offset"] else "")
                if reader.stats.rows % chunk_rows == 0:
                    bar.update(row_end - bar.n)
                continue
            chunk.append(passage)
            if len(chunk) == chunk_rows:
                flush(chunk, row_end)
                chunk = []
        if reader.stats.rows < done:
            _check_prefix(corpus, state, "")
        flush(chunk, row_end)
        docs.finish()
        state.update(encoded=True, sha256=hasher.to(reader.stats.offset))
        write_json_atomic(os.path.join(out, STATE), state)
    finally:
        bar.close()
        reader.close()
        emb_file.close()
        docs.close()


def _check_prefix(corpus: str, state: dict, sha: str) -> None:
    if sha != state["prefix_sha256"]:
        raise ValueError(
            f"{corpus} changed since the interrupted build (its first {state['offset']} bytes, "
            f"{state['rows']} rows, differ); start over with resume=False / --no-resume"
        )


def _existing_index(out: str, corpus: str, desc: dict, backend: str) -> dict:
    """An already complete index is returned if it was built from the same inputs, never overwritten."""
    manifest = read_json(os.path.join(out, MANIFEST), hint=_DAMAGED)
    differs = [
        what
        for what, same in [
            (
                "corpus",
                manifest["corpus"]["size"] == os.path.getsize(corpus)
                and manifest["corpus"]["sha256"] == file_sha256(corpus),
            ),
            ("encoder", manifest["encoder"] == desc),
            ("backend", manifest["backend"] == backend),
        ]
        if not same
    ]
    if differs:
        raise FileExistsError(
            f"{out} already holds a complete index built with a different {', '.join(differs)}; "
            "remove it or choose another output directory"
        )
    print(f"{out} is already a complete index of {corpus}; nothing to do")
    if os.path.exists(os.path.join(out, STATE)):  # a build stopped between writing the manifest and cleaning up
        os.remove(os.path.join(out, STATE))
    DocStoreWriter.cleanup(out)
    return manifest


def build_index(
    corpus: str,
    encoder: Any,
    out: str,
    *,
    backend: str = "auto",
    batch_size: int = 256,
    skip_bad: bool = False,
    resume: bool = True,
    chunk_rows: int = CHECKPOINT_ROWS,
    limits: TextLimits = DEFAULT_LIMITS,
) -> dict:
    """Build (or resume building) an index of `corpus` in `out`; returns the manifest.

    `encoder` is an encoder object or the path of one. Bad corpus lines (see `rexrag_jax.untrusted`; `limits`
    bounds a line's bytes, a string's length and the nesting depth) raise `CorpusError` unless `skip_bad`,
    which skips and counts them (printed and stored in the manifest). A checkpoint is written every
    `chunk_rows` rows: a kill loses at most that many rows of encoding. The corpus must not live in `out`.
    """
    backend = resolve_backend(backend)
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus file {corpus} does not exist")
    if type(chunk_rows) is not int or chunk_rows < 1:
        raise ValueError(f"chunk_rows (--checkpoint-rows) must be a positive integer, got {chunk_rows!r}")
    corpus = os.path.abspath(corpus)
    if is_within(corpus, out):
        raise ValueError(
            f"the corpus {corpus} lies inside the output directory {out}, where the build writes "
            f"its own files ({DOCS_FILE} among them); choose an --out that does not hold the corpus"
        )
    encoder = _load_encoder(encoder) if isinstance(encoder, str) else encoder
    desc = _describe(encoder)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        return _existing_index(out, corpus, desc, backend)

    fresh = {
        "version": FORMAT_VERSION,
        "corpus": {"path": corpus, "size": os.path.getsize(corpus)},
        "encoder": desc,
        "dim": int(encoder.dim),
        "skip_bad": skip_bad,
        "rows": 0,
        "docs_bytes": 0,
        "offset": 0,
        "prefix_sha256": hashlib.sha256().hexdigest(),
        "encoded": False,
        "limits": dataclasses.asdict(limits),
    }
    state_path = os.path.join(out, STATE)
    state = read_json(state_path) if resume and os.path.exists(state_path) else None
    if state is not None:
        # skip_bad may change: the replay re-reads the indexed prefix under the new setting
        differs = [key for key in ("version", "corpus", "encoder", "dim", "limits") if state.get(key) != fresh[key]]
        if differs:
            raise ValueError(
                f"{state_path} is from a build with a different {', '.join(differs)}; start over "
                "with resume=False / --no-resume (or use another output directory)"
            )
        print(f"resuming the build in {out} after {state['rows']} rows")
        state["skip_bad"] = skip_bad
    else:
        state = fresh
        shutil.rmtree(os.path.join(out, SCANN_DIR), ignore_errors=True)

    if state["encoded"]:
        if file_sha256(corpus) != state["sha256"]:
            raise ValueError(
                f"{corpus} changed since the interrupted build; start over with resume=False / --no-resume"
            )
        if state["stats"]["skipped"] and not skip_bad:
            raise CorpusError(state["stats"]["first_errors"][0] + SKIP_HINT)
    else:
        _encode_corpus(corpus, encoder, out, state, batch_size=batch_size, chunk_rows=chunk_rows, limits=limits)
    stats = state["stats"]
    if state["rows"] == 0:
        raise ValueError(f"{corpus} has no valid rows to index ({stats['skipped']} bad, {stats['blank']} blank lines)")
    print(
        f"indexed {state['rows']} rows of {corpus}: skipped {stats['skipped']} bad lines "
        f"({stats['duplicates']} duplicate ids), {stats['blank']} blank lines"
    )
    for error in stats["first_errors"]:
        print(f"  skipped {error}")

    params = None
    if backend == "scann":
        params = scann_params(state["rows"])
        emb = np.fromfile(os.path.join(out, EMBEDDINGS), dtype="<f4").reshape(state["rows"], state["dim"])
        tmp = os.path.join(out, SCANN_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ScannSearcher.build(emb, params).save(tmp)
        shutil.rmtree(os.path.join(out, SCANN_DIR), ignore_errors=True)
        os.replace(tmp, os.path.join(out, SCANN_DIR))

    manifest = {
        "format": "rexrag-index",
        "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "encoder": desc,
        "dim": state["dim"],
        "dtype": "float32",
        "backend": backend,
        "scann": params,
        "corpus": {**state["corpus"], "sha256": state["sha256"]},
        "counts": {
            "rows": state["rows"],
            "skipped": stats["skipped"],
            "duplicates": stats["duplicates"],
            "blank": stats["blank"],
            "lines": stats["lines"],
        },
        "first_errors": stats["first_errors"],
        "files": {EMBEDDINGS: state["rows"] * state["dim"] * 4, DOCS_FILE: state["docs_bytes"]},
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    os.remove(state_path)
    DocStoreWriter.cleanup(out)
    return manifest


def load_index(path: str, *, encoder: Any = None, backend: str | None = None, chunk_rows: int = 65536) -> Index:
    """Open an index directory. `encoder=None` loads the one recorded in the manifest; `backend=None` uses the
    manifest's (falling back to exact search, with a note, where scann cannot be imported)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"index directory {path} does not exist")
    if not os.path.exists(manifest_path):
        if os.path.exists(os.path.join(path, STATE)):
            raise FileNotFoundError(
                f"index at {path} is incomplete: build was interrupted; rerun "
                f"`rexrag-index build --corpus ... --encoder ... --out {path}` to resume"
            )
        raise FileNotFoundError(f"{path} is not an index (no {MANIFEST}); build one with `rexrag-index build`")
    manifest = read_json(manifest_path, hint=_DAMAGED)
    if manifest.get("format") != "rexrag-index" or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path}: unsupported index format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r} (this code reads version {FORMAT_VERSION}); rebuild the index"
        )
    for name, size in manifest["files"].items():
        actual = os.path.getsize(os.path.join(path, name)) if os.path.exists(os.path.join(path, name)) else None
        if actual != size:
            raise ValueError(
                f"index at {path} is damaged: {name} has {actual} bytes, the manifest says {size}; rebuild it"
            )
    rows, dim = manifest["counts"]["rows"], manifest["dim"]
    if encoder is None:
        encoder = _load_encoder(manifest["encoder"]["path"], manifest["encoder"])
    encoder = _load_encoder(encoder) if isinstance(encoder, str) else encoder
    if int(encoder.dim) != dim:
        raise ValueError(f"encoder dim {encoder.dim} does not match the index dim {dim} ({path})")
    _check_encoder_matches(encoder, manifest["encoder"], path)

    embeddings = np.memmap(os.path.join(path, EMBEDDINGS), dtype="<f4", mode="r", shape=(rows, dim))
    if backend is None:
        backend = manifest["backend"]
        if backend == "scann" and not scann_available():
            print("note: scann is not importable; searching this index exactly instead")
            backend = "exact"
    if backend == "exact":
        searcher: Any = ExactSearcher(embeddings, chunk_rows=chunk_rows)
    elif backend == "scann":
        if manifest["backend"] != "scann":
            raise ValueError(f"index at {path} was built without a ScaNN searcher; load it with backend='exact'")
        try:
            searcher = ScannSearcher.load(os.path.join(path, SCANN_DIR), manifest["scann"])
        except ImportError as e:
            raise RuntimeError(SCANN_MISSING.format(err=e)) from e
    else:
        raise ValueError(f"backend must be 'scann', 'exact' or None, got {backend!r}")

    docs = DocStore(path)  # opened last: nothing after it can fail and leak its file descriptor
    if len(docs) != rows:
        docs.close()
        raise ValueError(f"index at {path} is damaged: the doc store has {len(docs)} rows, the manifest {rows}")
    return Index(path, manifest, embeddings, docs, searcher, encoder)
