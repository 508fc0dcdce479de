"""The `make demo` smoke job, shortened: export/reload, sharded training, cached decoding, the search leg."""

import configs.smoke as smoke_config
from rexrag_jax.cli.smoke import run


def test_smoke_run_short(tmp_path, devices):
    cfg = smoke_config.get_config()
    with cfg.unlocked():
        cfg.train.steps = 4
        cfg.generate.max_new_tokens = 4
    report = run(cfg, str(tmp_path))
    assert report["devices"] == 8
    assert report["export_reload_max_diff"] == 0.0
    assert report["cache_vs_full_max_diff"] < 1e-4
    assert report["loss_last"] < report["loss_first"]
    assert (tmp_path / "hf_init" / "config.json").is_file() and (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_smoke_search_action_goes_through_the_retrieval_server(tmp_path):
    from rexrag_jax.cli.smoke import search_action

    cfg = smoke_config.get_config()
    out = search_action(cfg, str(tmp_path), cfg.response)
    assert out["search_query"] == "Vellbrook old mill river"
    assert out["retrieved"][0] == cfg.retrieval.expected_id and len(out["retrieved"]) == cfg.retrieval.topk
    assert search_action(cfg, str(tmp_path), "<answer> no search </answer>") ["retrieved"] == []
