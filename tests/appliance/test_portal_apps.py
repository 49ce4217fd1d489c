from pathlib import Path

import pytest
import yaml

from tokenmill_appliance.portal_apps import (
    PortalApp,
    PortalConfigError,
    load_apps,
    parse_portal_config,
    read_portal_yaml,
    write_portal_yaml,
)
from tokenmill_appliance.settings import DEFAULT_PORTAL_CONFIG, Settings


def make(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"TOKENMILL_ROOT": str(tmp_path), **env})


def test_parse_portal_config_keeps_order_and_colons_in_name() -> None:
    apps = parse_portal_config("localhost:1111:11111:/:Instance Portal|h:9000:9000:/x:Name: with colon")
    assert [a.name for a in apps] == ["Instance Portal", "Name: with colon"]
    assert apps[0].is_proxied and not apps[1].is_proxied
    assert apps[1].open_path == "/x"


def test_parse_portal_config_later_duplicate_wins() -> None:
    apps = parse_portal_config("h:1:11:/:A|h:2:22:/:B|h:3:33:/:A")
    assert [(a.name, a.external_port) for a in apps] == [("A", 3), ("B", 2)]


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("localhost:1111:/:Portal", "'localhost:1111:/:Portal'"),
        ("localhost:abc:11111:/:Portal", "external port 'abc'.*'localhost:abc:11111:/:Portal'"),
        ("localhost:1111:99999:/:Portal", "out of range"),
        ("h:1111:11111:/:A|h:1111:2222:/:B", "both proxy external port 1111"),
    ],
)
def test_parse_portal_config_errors_name_the_entry(config: str, match: str) -> None:
    with pytest.raises(PortalConfigError, match=match):
        parse_portal_config(config)


def test_portal_yaml_round_trip(tmp_path: Path) -> None:
    apps = parse_portal_config(DEFAULT_PORTAL_CONFIG)
    path = tmp_path / "etc/portal.yaml"
    write_portal_yaml(path, apps)
    assert read_portal_yaml(path) == apps
    data = yaml.safe_load(path.read_text())
    assert list(data["applications"]) == ["Instance Portal", "vLLM API", "Ray Dashboard", "Jupyter"]
    assert data["applications"]["vLLM API"] == {
        "hostname": "localhost",
        "external_port": 8000,
        "internal_port": 18000,
        "open_path": "/docs",
        "name": "vLLM API",
    }
    assert not list(path.parent.glob(".*tmp"))


def test_load_apps_writes_missing_file_and_existing_wins(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="t", PORTAL_CONFIG="h:1:11:/:A")
    assert load_apps(s) == [PortalApp("A", "h", 1, 11, "/")]
    assert s.portal_yaml.exists()
    other = make(tmp_path, OPEN_BUTTON_TOKEN="t", PORTAL_CONFIG="h:2:22:/:B")
    assert [a.name for a in load_apps(other)] == ["A"]


def test_load_apps_rewrites_empty_file_and_keeps_invalid_one(tmp_path: Path) -> None:
    s = make(tmp_path, OPEN_BUTTON_TOKEN="t", PORTAL_CONFIG="h:1:11:/:A")
    s.portal_yaml.parent.mkdir(parents=True)
    s.portal_yaml.write_text("")
    assert [a.name for a in load_apps(s)] == ["A"]
    assert "A" in s.portal_yaml.read_text()
    s.portal_yaml.write_text("applications: [not, a, mapping]\n")
    assert [a.name for a in load_apps(s)] == ["A"]
    assert s.portal_yaml.read_text() == "applications: [not, a, mapping]\n"
