"""The `make smoke` job, shortened: export/reload, sharded training, cached decoding, a rollout whose
search goes through the retrieval server."""

import configs.smoke as smoke_config
from rexrag_jax.cli.smoke import run


def test_smoke_run_short(tmp_path, devices):
    cfg = smoke_config.get_config()
    with cfg.unlocked():
        cfg.train.steps = 4
        cfg.generate.max_new_tokens = 6
    report = run(cfg, str(tmp_path))
    assert report["devices"] == 8
    assert report["export_reload_max_diff"] == 0.0
    assert report["cache_vs_full_max_diff"] < 1e-4 and report["rows_agree"]
    assert report["loss_last"] < report["loss_first"]
    assert report["turns"] == 2 and report["finish"] == "final_turn" and report["decode_tokens"] > 0
    assert (tmp_path / "hf_init" / "config.json").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_smoke_corpus_is_served_over_http(tmp_path):
    from rexrag_jax.cli.smoke import serve_corpus

    cfg = smoke_config.get_config()
    with serve_corpus(cfg, str(tmp_path)) as client:
        hits = client.search(["Vellbrook old mill river"], k=cfg.retrieval.topk)[0]
    assert [h.id for h in hits][0] == cfg.retrieval.expected_id and len(hits) == cfg.retrieval.topk
