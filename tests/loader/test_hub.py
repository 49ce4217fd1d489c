import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from tokenmill.loader import resolve_model, resolve_tokenizer
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


def cached_snapshot(cache_dir: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A snapshot laid out as huggingface_hub's cache does: refs/main names the commit under snapshots/."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_gguf_file_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("some-org/some-model-GGUF/model-Q4_K_M.gguf", download_dir=str(tmp_path))
    assert "model some-org/some-model-GGUF/model-Q4_K_M.gguf not found locally" in str(caught.value)
    assert REMEDY in str(caught.value)


def test_cached_gguf_file_is_used_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    snapshot = cached_snapshot(tmp_path, "some-org/some-model-GGUF", {"model-Q8_0.gguf": ""})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("some-org/some-model-GGUF/model-Q8_0.gguf", download_dir=str(tmp_path))
    assert source.gguf_file == (snapshot / "model-Q8_0.gguf").resolve()


def test_repository_without_config_points_to_its_gguf_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cached_snapshot(tmp_path, "some-org/some-model-GGUF", {"README.txt": ""})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="pass one of its files as some-org/some-model-GGUF/<file>"):
        resolve_model("some-org/some-model-GGUF", download_dir=str(tmp_path))


def test_cached_snapshot_is_used_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    snapshot = cached_snapshot(tmp_path, "some-org/cached-model", {"config.json": "{}"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("some-org/cached-model", download_dir=str(tmp_path))
    assert source.name == "some-org/cached-model"
    assert source.path == snapshot.resolve()
    assert source.gguf_file is None


@pytest.mark.timeout(120)
def test_offline_environment_variable_in_a_fresh_process(tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the real variable needs a fresh interpreter.
    script = "from tokenmill.loader import resolve_model; resolve_model('some-org/some-model', sys.argv[1])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; {script}", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 1
    assert "ModelNotFoundError: model some-org/some-model not found locally" in result.stderr
    assert REMEDY in result.stderr


def test_a_hub_tokenizer_offline_and_not_cached_is_named_as_a_tokenizer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_tokenizer("some-org/base-model", resolve_model(None), download_dir=str(tmp_path))
    assert "tokenizer some-org/base-model not found locally" in str(caught.value)
    assert REMEDY in str(caught.value)


def test_a_cached_tokenizer_repository_without_weights_is_used_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    snapshot = cached_snapshot(tmp_path, "some-org/base-model", {"tokenizer.json": "{}"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = resolve_tokenizer("some-org/base-model", resolve_model(None), download_dir=str(tmp_path))
    assert source.path == snapshot.resolve() and source.gguf_file is None
