from pathlib import Path

import pytest

from shoprec.config import ConfigError, load_settings


def test_layering_file_env_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "shoprec.toml"
    cfg.write_text('[shoprec]\nhome = "from-file"\nseed = 7\n')
    monkeypatch.delenv("SHOPREC_HOME", raising=False)
    s = load_settings(cfg)
    assert s.home == Path("from-file") and s.seed == 7
    monkeypatch.setenv("SHOPREC_HOME", "from-env")
    assert load_settings(cfg).home == Path("from-env")
    assert load_settings(cfg, home=Path("from-flag")).home == Path("from-flag")
    assert load_settings(cfg, home=Path("x")).store_url == "sqlite:///x/shoprec.db"


def test_bad_values_name_key_and_source(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPREC_HOME", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text("dense_flat_threshold = -3\n")
    with pytest.raises(ConfigError, match=r"'dense_flat_threshold' \(from .*c.toml\)"):
        load_settings(cfg)
    cfg.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="'colour'.*Valid keys"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_new_item_share_from_the_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    monkeypatch.setenv("SHOPREC_NEW_ITEM_SHARE", "0.1")
    assert load_settings(cfg).new_item_share == 0.1
    monkeypatch.setenv("SHOPREC_NEW_ITEM_SHARE", "0.9")
    with pytest.raises(ConfigError, match="new_item_share"):
        load_settings(cfg)
