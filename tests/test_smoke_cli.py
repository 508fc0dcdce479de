"""The `make demo` smoke job, shortened: export/reload, sharded training steps and cached decoding."""

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
