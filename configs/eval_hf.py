"""Evaluate a HF model directory with `rexrag-eval` on one CPU device (docs/evaluating_hf_models.md).

    rexrag-eval --config configs/eval_hf.py --checkpoint MODEL_DIR --datasets nq,hotpotqa --limit 10

The architecture (and, when the directory has tokenizer files, the tokenizer) comes from `--checkpoint`,
a HF directory with config.json + *.safetensors (model.init="hf"); decoding is greedy, one trajectory per
question, with the paper's rollout limits: 5 search turns, 500 tokens per response and per retrieved
block, prompts up to 2048 tokens, 4096 in all, top-3 passages per search.

Name the retriever, exactly one of: `--config.retrieval.url=http://host:8000` (a `rexrag-retrieve` or
Search-R1 server), `--config.retrieval.index=DIR` (a `rexrag-index` directory) or
`--config.retrieval.corpus=FILE.jsonl` (indexed with MiniLM into the output folder on first use; e.g. the
12-passage `configs/data/tiny_corpus.jsonl`). The questions default to the tiny eval sets
(configs/data/tiny_eval: nq, hotpotqa); real ones: `--config.eval.data_dir=FlashRAG_datasets/` (or a
Search-R1 test.parquet).
"""

import ml_collections

from rexrag_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    # One CPU device: no fake devices, a 1 x 1 x 1 mesh. On an accelerator host set --config.cpu_devices=0
    # and e.g. --config.mesh.data=-1 to spread the questions over every device.
    c.cpu_devices = 1
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.model.init = "hf"  # the architecture comes from the checkpoint's config.json
    c.model.path = ""  # not needed for a HF --checkpoint; for a training checkpoint, the HF dir it started from
    c.model.dtype = "float32"  # CPUs compute bfloat16 slowly; on accelerators --config.model.dtype=bfloat16
    c.tokenizer = ""  # "": the checkpoint directory's own tokenizer (else Qwen2.5's)
    c.rollout.update(
        max_turns=5,
        max_response_length=500,
        max_obs_length=500,
        max_start_length=2048,
        max_context_length=4096,
        topk=3,
        group_size=1,
        temperature=0.0,
        probe_prob=0.0,
    )  # greedy (rexrag-eval always is)
    # c.retrieval: set one of url / index / corpus on the command line (see above)
    c.eval.update(data_dir="configs/data/tiny_eval", batch_size=8)  # 8 rows' KV caches of 4096 tokens
    c.progress = True
    return c
