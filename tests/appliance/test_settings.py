import os
import stat
from pathlib import Path

import pytest

from tokenmill_appliance.settings import DEFAULT_PORTAL_CONFIG, Settings, SettingsError, mask_token, root_path


def make(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"TOKENMILL_ROOT": str(tmp_path), **env})


def test_root_path_resolves_absolute_paths_under_root(tmp_path: Path) -> None:
    assert root_path("/etc/portal.yaml", tmp_path) == tmp_path / "etc/portal.yaml"
    assert root_path("/etc/portal.yaml", "/") == Path("/etc/portal.yaml")
    assert root_path("relative/x", tmp_path) == Path("relative/x")
    # Already under the root (WORKSPACE=$TOKENMILL_ROOT/ws): not rooted a second time.
    assert root_path(tmp_path / "ws", tmp_path) == tmp_path / "ws"
    settings = Settings.from_env({"TOKENMILL_ROOT": str(tmp_path), "WORKSPACE": str(tmp_path / "ws")})
    assert settings.workspace == tmp_path / "ws"


def test_defaults(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="tok")
    assert s.workspace == tmp_path / "workspace"
    assert s.portal_yaml == tmp_path / "etc/portal.yaml"
    assert s.log_dir == tmp_path / "var/log/portal"
    assert s.web_username == "vastai"
    assert s.enable_auth and s.enable_https and s.auto_parallel
    assert s.auth_exclude == frozenset()
    assert s.venv_backup_count == 48
    assert s.cookie_name == "portal_auth_token"
    assert s.vllm_argv == [
        "--max-model-len", "32768", "--enforce-eager",
        "--download-dir", str(tmp_path / "workspace/models"),
        "--host", "127.0.0.1", "--port", "18000",
    ]  # fmt: skip
    assert s.portal_config == DEFAULT_PORTAL_CONFIG
    assert s.portal_host == "0.0.0.0"


def test_vllm_args_split_with_shell_rules_never_evaluated(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="t", VLLM_ARGS="--a 'b c' $(touch /tmp/x) \"d\"")
    assert s.vllm_argv == ["--a", "b c", "$(touch", "/tmp/x)", "d"]
    with pytest.raises(SettingsError, match="VLLM_ARGS"):
        make(tmp_path, OPEN_BUTTON_TOKEN="t", VLLM_ARGS="--a 'unbalanced")


def test_tokens_default_to_each_other_and_are_cleaned(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="ab\r\nc;d")
    assert s.open_button_token == s.web_password == "abcd"
    s = make(tmp_path, WEB_PASSWORD="pw")
    assert s.open_button_token == s.web_password == "pw"
    s = make(tmp_path, WEB_PASSWORD="pw", OPEN_BUTTON_TOKEN="tok")
    assert s.tokens == ("tok", "pw")
    assert not s.is_token_generated


def test_one_random_token_when_both_unset_shared_across_processes(tmp_path: Path) -> None:
    first = make(tmp_path)
    second = make(tmp_path)
    assert first.is_token_generated
    assert len(first.open_button_token) >= 32
    assert first.open_button_token == first.web_password == second.open_button_token
    assert stat.S_IMODE(os.stat(first.token_file).st_mode) == 0o600
    assert make(tmp_path / "other").open_button_token != first.open_button_token


def test_token_not_in_repr(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="supersecret-token", CF_TUNNEL_TOKEN="cfsecret")
    assert "supersecret" not in repr(s) and "cfsecret" not in repr(s)


def test_mask_token_shows_only_last_four() -> None:
    assert mask_token("abcdefghijklmnop") == "********mnop"
    assert mask_token("abcdefghijklmno") == "********"  # a short password keeps all of itself hidden
    assert mask_token("tok12345") == "********"
    assert mask_token("abcd") == "********"


def test_booleans_ports_and_aliases(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="t", ENABLE_AUTH="false", ENABLE_HTTPS="0", AUTH_EXCLUDE="8000,8080")
    assert not s.enable_auth and not s.enable_https
    assert s.auth_exclude == frozenset({8000, 8080})
    assert not make(tmp_path, OPEN_BUTTON_TOKEN="t", USE_ALL_GPUS="false").auto_parallel
    assert make(tmp_path, OPEN_BUTTON_TOKEN="t", AUTO_PARALLEL="true", USE_ALL_GPUS="false").auto_parallel
    with pytest.raises(SettingsError, match="ENABLE_AUTH"):
        make(tmp_path, OPEN_BUTTON_TOKEN="t", ENABLE_AUTH="maybe")
    # An empty value is the default (true), as for every other variable: it never turns auth off.
    empty = make(tmp_path, OPEN_BUTTON_TOKEN="t", ENABLE_AUTH="", ENABLE_HTTPS=" ", AUTO_PARALLEL="")
    assert empty.enable_auth and empty.enable_https and empty.auto_parallel
    assert not make(tmp_path, OPEN_BUTTON_TOKEN="t", AUTO_PARALLEL="", USE_ALL_GPUS="false").auto_parallel
    with pytest.raises(SettingsError, match="AUTH_EXCLUDE"):
        make(tmp_path, OPEN_BUTTON_TOKEN="t", AUTH_EXCLUDE="80,x")
    assert make(tmp_path, OPEN_BUTTON_TOKEN="t", VAST_CONTAINERLABEL="C.42").cookie_name == "C.42_auth_token"
