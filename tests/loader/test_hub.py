import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from tokenmill.loader import resolve_model
from tokenmill.loader.hub import ModelNotFoundError, download_from_hub

REMEDY = "pass a local path, or pre-download it into --download-dir"


def test_offline_and_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("some-org/some-model", download_dir=str(tmp_path))
    message = str(caught.value)
    assert "model some-org/some-model not found locally" in message
    assert str(tmp_path) in message
    assert REMEDY in message


@pytest.mark.timeout(60)
def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="the hub is unreachable") as caught:
        download_from_hub("some-org/some-model", download_dir=str(tmp_path))
    assert REMEDY in str(caught.value)
    assert time.monotonic() - started < 30


def test_cached_snapshot_is_used_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The layout huggingface_hub's cache uses: refs/<revision> names the commit under snapshots/.
    repo = tmp_path / "models--some-org--cached-model"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("some-org/cached-model", download_dir=str(tmp_path))
    assert source.name == "some-org/cached-model"
    assert source.path == snapshot.resolve()
    assert source.gguf_file is None
