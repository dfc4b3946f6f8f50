"""The command line, as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chunkcache.cli import build_parser, main


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "chunkcache.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_supported_file_types(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "--help"])
    out = capsys.readouterr().out
    assert ".jsonl" in out and ".md" in out and "skipped" in out


def test_runtime_errors_exit_1_and_usage_errors_2(tmp_path, capsys):
    assert main(["info", "--store", str(tmp_path / "none")]) == 1
    assert "chunkcache ingest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["query"])  # no question
    assert usage.value.code == 2


@pytest.mark.parametrize("command", [["query", "what?"], ["serve"]])
def test_a_mistyped_store_is_refused_not_created(tmp_path, capsys, command):
    missing = tmp_path / "stores" / "mydcos"
    assert main([*command, "--store", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"no store at {missing}" in err and "--create" in err
    assert not missing.exists()


def test_quiet_and_log_level_are_global_flags():
    args = build_parser().parse_args(["--quiet", "--log-level", "debug", "info"])
    assert args.quiet and args.log_level == "DEBUG"


@pytest.mark.slow
def test_ingest_then_query_json_with_default_models(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The Danube flows through Vienna and Budapest to the Black Sea.")
    (corpus / "b.bin").write_bytes(b"\x00\x01\x02")
    store = tmp_path / "store"
    done = run_cli("ingest", str(corpus), "--store", str(store), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "0 skipped, 1 ignored" in done.stdout and "1 computed" in done.stdout
    again = run_cli("ingest", str(corpus), "--store", str(store), "--no-progress")
    assert "0 computed" in again.stdout and "1 unchanged" in again.stdout
    asked = run_cli("query", "Which sea does the Danube reach?", "--store", str(store), "--top-k", "1",
                    "--max-new-tokens", "8", "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert answer["stats"]["chunk_hits"] == 1 and answer["ttft_s"] > 0
    assert "Danube" in answer["sources"][0]["text"]
    bad = run_cli("query", "x", "--store", str(store), "--top-k", "5")
    assert bad.returncode == 1 and "holds only 1 chunks" in bad.stderr


def test_serve_flags_translate_into_settings():
    from chunkcache.cli import overrides_from
    from chunkcache.server import ServerSettings

    args = build_parser().parse_args(["serve", "--document-quota", "2M", "--no-persist-documents",
                                      "--admin-key", "adm", "--api-key", "k:team"])
    assert overrides_from(args, ("document_quota_bytes", "persist_documents")) == {
        "document_quota_bytes": 2 * 1024 * 1024, "persist_documents": False}
    settings = ServerSettings.from_args(args, {})
    assert settings.admin_key == "adm" and settings.api_keys == {"k": "team"} and settings.metrics_need_admin
    assert overrides_from(build_parser().parse_args(["serve"]), ("document_quota_bytes", "persist_documents")) == {}


def test_version_flag(capsys):
    from chunkcache import __version__
    from chunkcache.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"chunkcache {__version__}"
