"""Settings from CHUNKCACHE_* variables and a TOML file (pydantic-settings), with flags over both."""
from __future__ import annotations

import pytest

from chunkcache.cli import build_parser, config_overrides
from chunkcache.config_sources import SettingsError, load_sources
from chunkcache.server.settings import ServerSettings

TOML = """
[pipeline]
top_k = 6
mode = "reuse"
chunk_scale = 0.5
max_running = 2

[server]
max_pending = 7
cors_origins = ["https://app.example"]
model_name = "from-file"
"""


@pytest.fixture
def settings_file(tmp_path, monkeypatch):
    for name in ("CHUNKCACHE_CONFIG", "CHUNKCACHE_TOP_K", "CHUNKCACHE_MAX_PENDING"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "chunkcache.toml"
    path.write_text(TOML)
    return path


def test_the_environment_wins_over_the_file(settings_file, monkeypatch):
    monkeypatch.setenv("CHUNKCACHE_TOP_K", "9")
    monkeypatch.setenv("CHUNKCACHE_MAX_PENDING", "3")
    monkeypatch.setenv("CHUNKCACHE_HOME", "/somewhere")  # not a setting: left alone
    sources = load_sources(settings_file)
    assert sources.config == {"top_k": 9, "mode": "reuse", "chunk_scale": 0.5, "max_running": 2}
    assert sources.server == {"max_pending": 3, "cors_origins": ("https://app.example",), "model_name": "from-file"}


def test_flags_win_over_both(settings_file, monkeypatch):
    monkeypatch.setenv("CHUNKCACHE_CONFIG", str(settings_file))
    args = build_parser().parse_args(["serve", "--top-k", "2", "--model-name", "from-flag"])
    args.settings = load_sources(args.config)  # $CHUNKCACHE_CONFIG, as `chunkcache` does
    overrides = config_overrides(args, ("top_k", "mode"))
    assert overrides["top_k"] == 2 and overrides["mode"] == "reuse" and overrides["max_running"] == 2
    server = ServerSettings.from_args(args, environ={}, base=args.settings.server)
    assert server.model_name == "from-flag" and server.max_pending == 7
    assert server.cors_origins == ("https://app.example",)


@pytest.mark.parametrize("text, env, match", [
    ("[pipeline]\ntopk = 3\n", {}, "topk: Extra inputs are not permitted"),
    ("[pipeline]\nmode = \"turbo\"\n", {}, "unknown mode 'turbo'"),
    ("", {"CHUNKCACHE_MAX_RUNNING": "many"}, "max_running"),
    ("not = [toml", {}, "chunkcache.toml"),
    ("[server]\nmax_pending = \"lots\"\n", {}, "max_pending"),
])
def test_bad_settings_name_what_is_wrong(tmp_path, monkeypatch, text, env, match):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "chunkcache.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=match):
        load_sources(path)


def test_a_missing_settings_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="no settings file"):
        load_sources(tmp_path / "nope.toml")
