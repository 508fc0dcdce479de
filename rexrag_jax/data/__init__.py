"""Training and evaluation data: QA examples and their readers, TFDS builds, the agent's prompt, and
resumable batch iterators (names load on first use, so importing this package stays cheap)."""

from rexrag_jax.lazy import lazy_exports

_M = "rexrag_jax.data."
__getattr__, __all__ = lazy_exports(
    __name__,
    {
        **{n: _M + "prompts" for n in ("build_prompt", "normalize_question", "prompt_ids")},
        "QAExample": _M + "questions",
        **{
            n: _M + "readers"
            for n in ("QADataError", "ReadReport", "read_flashrag_jsonl", "read_qa_file", "read_search_r1_parquet")
        },
        "TrainBatches": _M + "pipeline",
        **{
            n: _M + "tfds_builders"
            for n in (
                "EVAL_DATASETS",
                "TRAIN_MIX",
                "QASource",
                "build_dataset",
                "built_splits",
                "flashrag_split_file",
                "flashrag_train_files",
                "load_split",
            )
        },
    },
)
