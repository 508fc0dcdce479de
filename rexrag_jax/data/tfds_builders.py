"""TFDS datasets for the 7 evaluation sets and the NQ+HotpotQA training mix, built from local files.

One `GeneratorBasedBuilder` (`rexrag_qa`) with a builder config per dataset (`EVAL_DATASETS` + `TRAIN_MIX`).
It writes array_record files (TFRecord needs TensorFlow, which is not installed) with the features
`id`, `question`, `golden_answers` (a sequence of text) and `source`, in the order the input files list the
rows (`disable_shuffling`). Nothing here imports TensorFlow: building uses `download_and_prepare` with
array_record output, and reading uses `as_data_source`, never `as_dataset`.

Inputs are what `readers.read_qa_file` accepts (FlashRAG JSONL or Search-R1 parquet), so the bad-row policy is
the readers' one. On top of it:

* `source`: JSONL rows get the dataset name for an evaluation set; for the training mix, the name of the
  folder the file sits in when that is a known dataset (FlashRAG's `root/nq/train.jsonl` -> "nq"), else
  the file name without extension. Parquet rows carry their `data_source`.
* A Search-R1 parquet file given for one of the evaluation sets keeps only the rows whose `data_source` is
  that set (REX-RAG's `test.parquet` holds all seven); the others are counted in the report as
  `other_sources`, not as bad rows.
* A split built from several files concatenates them in the order given. JSONL ids are then prefixed with
  `f"{source}-"` (FlashRAG's train ids restart at `train_0` in every dataset); parquet ids already carry
  `data_source`. An id seen in an earlier file is a duplicate under the readers' policy.

A build records what it was built from (`rexrag_build.json` next to the data: each file's path, size,
mtime and sha256, plus `skip_bad`). Calling `build_dataset` again with the same inputs returns the recorded
report without rebuilding; a file whose size changed, or whose mtime changed and whose sha256 differs, or a
different set of files, rebuilds from scratch. Build on one host; every host can then `load_split`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath

from rexrag_jax.data.questions import QAExample
from rexrag_jax.data.readers import MAX_PROBLEMS, PARQUET_SUFFIXES, SKIP_HINT, QADataError, read_qa_file
from rexrag_jax.jsonfile import is_within, read_json, replace_dir, write_json_atomic
from rexrag_jax.untrusted import DEFAULT_LIMITS, TextLimits

EVAL_DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
TRAIN_MIX = "nq_hotpotqa"
MIX_SOURCES = ("nq", "hotpotqa")
DATASET_NAMES = EVAL_DATASETS + (TRAIN_MIX,)
BUILDER_NAME = "rexrag_qa"
MANIFEST_FILE = "rexrag_build.json"
_BUILD_FORMAT = 1  # bump when the way examples are derived from files changes
_FLASHRAG_EVAL_SPLITS = ("test", "dev")


def flashrag_split_file(root: str, name: str) -> tuple[str, str]:
    """(split, path) of the evaluation file of dataset `name` in FlashRAG's layout `root/<name>/<split>.jsonl`:
    `test` when it exists, else `dev` (docs/algorithm.md#data-and-evaluation)."""
    folder = os.path.join(root, name)
    for split in _FLASHRAG_EVAL_SPLITS:
        path = os.path.join(folder, f"{split}.jsonl")
        if os.path.isfile(path):
            return split, path
    if not os.path.isdir(folder):
        have = sorted(os.listdir(root)) if os.path.isdir(root) else None
        where = f"{root} does not exist" if have is None else f"{root} has {have or 'nothing'}"
        raise FileNotFoundError(f"no FlashRAG folder for {name!r}: {folder} does not exist ({where})")
    have = sorted(os.listdir(folder))
    raise FileNotFoundError(f"{folder} has neither test.jsonl nor dev.jsonl (it has {have or 'nothing'})")


def flashrag_train_files(root: str) -> list[str]:
    """The training mix's files in FlashRAG's layout: `root/nq/train.jsonl`, `root/hotpotqa/train.jsonl`."""
    paths = [os.path.join(root, name, "train.jsonl") for name in MIX_SOURCES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"training mix files missing: {missing}")
    return paths


class RexragQa(tfds.core.GeneratorBasedBuilder):
    """QA examples (id, question, golden answers, source) from local FlashRAG / Search-R1 files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{n} QA examples") for n in DATASET_NAMES]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' own version checks `isinstance(path, importlib_resources.abc.Traversable)` for a builder defined
        # in a package, and `importlib_resources` (a backport tfds only requires on Python < 3.9) is not installed.
        return epath.Path(__file__)

    def __init__(self, *, examples: Mapping[str, Sequence[QAExample]] | None = None, **kwargs):
        self._examples = examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="QA examples for REX-RAG training and evaluation, built from local files.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "question": tfds.features.Text(),
                    "golden_answers": tfds.features.Sequence(tfds.features.Text()),
                    "source": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
        )

    # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and prepared to
    # <staging dir>" on stdout: nothing is downloaded here, and build_dataset reports what it built itself.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        if self._examples is None:
            raise QADataError(f"{self.name}/{self.builder_config.name} is not built; use build_dataset()")
        return {split: self._generate_examples(rows) for split, rows in self._examples.items()}

    def _generate_examples(self, rows: Sequence[QAExample]):
        for key, ex in enumerate(rows):
            yield (
                key,
                {"id": ex.id, "question": ex.question, "golden_answers": list(ex.golden_answers), "source": ex.source},
            )


def _version_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, BUILDER_NAME, name, str(RexragQa.VERSION))


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASET_NAMES)}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _unchanged(recorded: dict) -> bool | None:
    """True if the file is what it was, False if not, None if only its mtime moved (content the same)."""
    try:
        st = os.stat(recorded["path"])
    except OSError:
        return False
    if st.st_size != recorded["size"]:
        return False
    if st.st_mtime_ns == recorded["mtime_ns"]:
        return True
    if _sha256(recorded["path"]) != recorded["sha256"]:
        return False
    recorded["mtime_ns"] = st.st_mtime_ns
    return None


def _normalise_files(name: str, files: Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(files, Mapping) or not files:
        raise ValueError(f"files for {name!r} must be a non-empty dict of split name -> path(s), got {files!r}")
    out = {}
    for split, paths in files.items():
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", split):
            raise ValueError(f"split name {split!r} must be letters, digits and '_' (starting with a letter)")
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError(f"split {split!r} of {name!r} has no files")
        paths = [os.path.abspath(os.fspath(p)) for p in paths]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"QA file {p} (split {split!r} of {name!r}) does not exist")
        if len(set(paths)) != len(paths):
            raise ValueError(f"split {split!r} of {name!r} lists a file twice: {paths}")
        out[split] = paths
    return out


def _jsonl_source(name: str, path: str) -> str:
    if name != TRAIN_MIX:
        return name
    folder = os.path.basename(os.path.dirname(path))
    if folder in EVAL_DATASETS:
        return folder
    stem = os.path.basename(path)
    return stem[: stem.index(".")] if "." in stem else stem


def _read_split(
    name: str, split: str, paths: list[str], skip_bad: bool, problems: list[str], limits: TextLimits
) -> tuple[list, dict]:
    examples: list[QAExample] = []
    first_file: dict[str, str] = {}
    stats = {"examples": 0, "skipped": 0, "other_sources": 0, "sources": {}, "files": paths}
    for path in paths:
        is_parquet = path.lower().endswith(PARQUET_SUFFIXES)
        report = read_qa_file(path, source=_jsonl_source(name, path), skip_bad=skip_bad, limits=limits)
        stats["skipped"] += report.skipped
        problems.extend(report.problems[: max(0, MAX_PROBLEMS - len(problems))])
        rows = report.examples
        if is_parquet and name in EVAL_DATASETS:
            kept = [ex for ex in rows if ex.source == name]
            if not kept:
                found = sorted(Counter(ex.source for ex in rows).items())
                raise QADataError(f"{path}: no rows with data_source {name!r} (it has {found})")
            stats["other_sources"] += len(rows) - len(kept)
            rows = kept
        if len(paths) > 1 and not is_parquet:
            rows = [QAExample(f"{ex.source}-{ex.id}", ex.question, ex.golden_answers, ex.source) for ex in rows]
        for ex in rows:
            if ex.id in first_file:
                message = f"{path}: duplicate id {ex.id!r} (already in {first_file[ex.id]})"
                if not skip_bad:
                    raise QADataError(message + SKIP_HINT)
                stats["skipped"] += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(message)
                continue
            first_file[ex.id] = path
            examples.append(ex)
    stats["examples"] = len(examples)
    stats["sources"] = dict(sorted(Counter(ex.source for ex in examples).items()))
    return examples, stats


@contextlib.contextmanager
def _quiet_progress():
    """No tfds progress bars (splits, examples, shuffling of a staging directory) while a local build runs;
    the caller prints a summary. Restores tfds' setting afterwards."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was)


def _check_inputs_outside(splits: dict[str, list[str]], out_dir: str) -> None:
    """A build replaces `out_dir`; an input file inside it would be deleted by its own build."""
    for paths in splits.values():
        for path in paths:
            if is_within(path, out_dir):
                raise ValueError(
                    f"QA file {path} lies inside the build output {out_dir}, which a build replaces; "
                    "move it or choose another --out"
                )


def build_dataset(
    name: str,
    files: Mapping[str, str | Sequence[str]],
    data_dir: str,
    *,
    skip_bad: bool = False,
    limits: TextLimits = DEFAULT_LIMITS,
) -> dict:
    """Build dataset `name` (one of `DATASET_NAMES`) into `data_dir` from local files: `files` maps a split
    name to a path or a list of paths (concatenated). Returns a report: per-split `examples` / `skipped` /
    `other_sources` / `sources` counts, the total `skipped`, the first `problems`, the `source_files` with
    their sha256, `path` (where the data lies) and `rebuilt` (False when an up-to-date build was reused)."""
    _check_name(name)
    splits = _normalise_files(name, files)
    data_dir = os.path.abspath(data_dir)
    out_dir = _version_dir(data_dir, name)
    _check_inputs_outside(splits, out_dir)
    inputs = {"format": _BUILD_FORMAT, "name": name, "skip_bad": bool(skip_bad), "splits": splits}
    if limits != DEFAULT_LIMITS:  # recorded only when set, so builds made before limits existed stay current
        inputs["limits"] = dataclasses.asdict(limits)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.isfile(manifest_path):
        manifest = read_json(manifest_path)
        if manifest.get("inputs") == inputs:
            states = [_unchanged(rec) for recs in manifest["files"].values() for rec in recs]
            if all(s is not False for s in states):
                if None in states:  # only mtimes moved: remember them so the next call skips the hashing
                    write_json_atomic(manifest_path, manifest)
                return {**manifest["report"], "rebuilt": False}

    fingerprints = {split: [_fingerprint(p) for p in paths] for split, paths in splits.items()}
    problems: list[str] = []
    examples, split_stats = {}, {}
    for split, paths in splits.items():  # read (and fail on bad rows) before the old build is removed
        examples[split], split_stats[split] = _read_split(name, split, paths, skip_bad, problems, limits)
    # Build beside the old data and swap only once the new build is complete: a failure leaves the old intact.
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-building-", dir=data_dir)
    try:
        builder = RexragQa(config=name, data_dir=staging, file_format="array_record", examples=examples)
        built_dir = os.path.abspath(os.fspath(builder.data_dir))
        with _quiet_progress():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        report = {
            "name": name,
            "path": out_dir,
            "splits": split_stats,
            "skipped": sum(s["skipped"] for s in split_stats.values()),
            "problems": problems,
            "source_files": {
                split: [{k: r[k] for k in ("path", "size", "sha256")} for r in recs]
                for split, recs in fingerprints.items()
            },
        }
        write_json_atomic(
            os.path.join(built_dir, MANIFEST_FILE), {"inputs": inputs, "files": fingerprints, "report": report}
        )
        replace_dir(built_dir, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**report, "rebuilt": True}


class QASource:
    """Random access to one built split: `len(src)`, `src[i] -> QAExample`, `src.__getitems__(indices)`
    (what grain's batching calls), iteration in file order."""

    def __init__(self, records, *, name: str, split: str):
        self._records, self.name, self.split = records, name, split
        self._len = len(records)

    def __len__(self) -> int:
        return self._len

    @staticmethod
    def _example(rec) -> QAExample:
        def text(v):
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)

        return QAExample(
            text(rec["id"]), text(rec["question"]), tuple(text(g) for g in rec["golden_answers"]), text(rec["source"])
        )

    def _index(self, i) -> int:
        i = int(i)
        j = i + self._len if i < 0 else i
        if not 0 <= j < self._len:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} ({self._len} examples)")
        return j

    def __getitem__(self, i) -> QAExample:
        return self._example(self._records[self._index(i)])

    def __getitems__(self, indices) -> list[QAExample]:
        return [self._example(r) for r in self._records.__getitems__([self._index(i) for i in indices])]

    _getitems = __getitems__  # grain's name for batched reads

    def __iter__(self):
        for start in range(0, self._len, 1024):
            yield from self.__getitems__(range(start, min(start + 1024, self._len)))

    def __repr__(self) -> str:
        return f"QASource({self.name}/{self.split}, {self._len} examples)"


def built_splits(name: str, data_dir: str) -> list[str]:
    """The splits of a built dataset (empty if it is not built)."""
    _check_name(name)
    manifest_path = os.path.join(_version_dir(os.path.abspath(data_dir), name), MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        return []
    return list(read_json(manifest_path)["inputs"]["splits"])


def load_split(name: str, split: str, data_dir: str) -> QASource:
    """Random access to split `split` of the built dataset `name` in `data_dir` (no TensorFlow)."""
    splits = built_splits(name, data_dir)
    if not splits:
        raise FileNotFoundError(
            f"dataset {name!r} is not built in {data_dir} (no {MANIFEST_FILE} under "
            f"{_version_dir(os.path.abspath(data_dir), name)}); run build_dataset first"
        )
    if split not in splits:
        raise KeyError(f"dataset {name!r} in {data_dir} has no split {split!r}; it has {splits}")
    builder = RexragQa(config=name, data_dir=os.path.abspath(data_dir), file_format="array_record")
    return QASource(builder.as_data_source(split=split), name=name, split=split)
