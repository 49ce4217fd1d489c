"""`tokenmill serve` flags: vLLM's names and meanings, size suffixes, and helpful errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.entrypoints.cli_args import parse_human_int, parse_serve_args
from tokenmill.sampling_params import GENERATION_CONFIG_KEYS
from tokenmill.tokenizer import GenerationDefaults

VLLM_IMAGE_ARGS = [
    "--max-model-len",
    "32768",
    "--enforce-eager",
    "--download-dir",
    "/models",
    "--host",
    "127.0.0.1",
    "--port",
    "18000",
    "--tensor-parallel-size",
    "1",
]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2048", 2048),
        ("32k", 32000),
        ("32K", 32768),
        ("1.5k", 1500),
        ("4GiB", 4 << 30),
        ("512MB", 512_000_000),
        ("2M", 2 << 20),
        ("64MiB", 64 << 20),
    ],
)
def test_human_ints(text: str, value: int) -> None:
    assert parse_human_int(text) == value


def test_vllm_instance_image_flags() -> None:
    args = parse_serve_args(["org/model", *VLLM_IMAGE_ARGS], environ={})
    engine = args.engine_args
    assert engine.model == "org/model" and engine.max_model_len == 32768 and engine.enforce_eager
    assert engine.download_dir == "/models" and engine.tensor_parallel_size == 1
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 18000, None)


def test_vllm_underscore_spellings_are_accepted() -> None:
    argv = [
        "org/model",
        "--max_model_len",
        "4k",
        "--served_model_name",
        "a_b",
        "--gpu_memory_utilization=0.5",
    ]
    args = parse_serve_args([*argv, "--api_key", "k_1", "--enable_prefix_caching"], environ={})
    assert args.engine_args.max_model_len == 4000 and args.engine_args.gpu_memory_utilization == 0.5
    assert args.served_model_names == ["a_b"] and args.api_key == "k_1"  # values keep their underscores


def test_vllm_flags_without_an_effect_are_accepted() -> None:
    plain = parse_serve_args(["org/model"], environ={})
    no_effect = [
        "--trust-remote-code",
        "--disable-log-stats",
        "--enable-chunked-prefill",
        "--swap-space",
        "4",
    ]
    no_effect += ["--disable-custom-all-reduce", "--distributed-executor-backend", "mp"]
    args = parse_serve_args(["org/model", *no_effect], environ={})
    assert args.engine_args == plain.engine_args and (args.host, args.port) == (plain.host, plain.port)


def test_other_vllm_flags() -> None:
    args = parse_serve_args(
        [
            "--dtype",
            "float32",
            "--max-num-seqs",
            "8",
            "--max-num-batched-tokens",
            "1k",
            "--gpu-memory-utilization",
            "0.5",
            "--kv-cache-memory",
            "1GiB",
            "--served-model-name",
            "a",
            "b",
            "--api-key",
            "k",
            "--generation-config",
            "vllm",
            "--no-enable-prefix-caching",
            "--seed",
            "7",
            "--allowed-origins",
            '["http://x"]',
            "--max-logprobs",
            "5",
            "--reasoning-parser",
            "deepseek_r1",
            "--uvicorn-log-level",
            "info",
            "--disable-log-requests",
            "--chat-template",
            "{{ messages }}",
            "--max-request-body-size",
            "1MiB",
        ],
        environ={},
    )
    engine = args.engine_args
    assert (engine.dtype, engine.max_num_seqs, engine.max_num_batched_tokens) == ("float32", 8, 1000)
    assert engine.kv_cache_memory == 1 << 30 and engine.gpu_memory_utilization == 0.5 and engine.seed == 7
    assert not engine.enable_prefix_caching and engine.model is None
    assert args.served_model_names == ["a", "b"] and engine.served_model_name == "a"
    assert args.allowed_origins == ["http://x"] and args.max_logprobs == 5 and args.api_key == "k"
    assert args.reasoning_parser == "deepseek_r1" and args.chat_template == "{{ messages }}"
    assert args.generation_config == "vllm" and not args.enable_log_requests
    assert args.max_request_body_size == 1 << 20


def test_tokenizer_flags_as_vllm_gguf_users_pass_them() -> None:
    argv = ["./model-Q4_K_M.gguf", "--tokenizer", "Qwen/Qwen3-0.6B", "--tokenizer-revision", "main"]
    engine = parse_serve_args(argv, environ={}).engine_args
    assert (engine.model, engine.tokenizer, engine.tokenizer_revision) == (argv[0], "Qwen/Qwen3-0.6B", "main")
    config = engine.create_engine_config().model
    assert (config.tokenizer, config.tokenizer_revision, config.revision) == ("Qwen/Qwen3-0.6B", "main", None)


def test_override_generation_config_takes_generation_config_names() -> None:
    argv = ["--override-generation-config", '{"temperature": 0.5, "max_new_tokens": 64}']
    assert parse_serve_args(argv, environ={}).override_generation_config == {
        "temperature": 0.5,
        "max_new_tokens": 64,
    }
    assert {f.name for f in dataclasses.fields(GenerationDefaults)} - {"eos_token_ids"} == set(
        GENERATION_CONFIG_KEYS
    )


def test_defaults_and_api_key_from_environment(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ x }}")
    args = parse_serve_args(["--chat-template", str(template)], environ={"VLLM_API_KEY": "from-env"})
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.max_request_body_size == 16 << 20
    assert args.api_key == "from-env" and args.chat_template == "{{ x }}"
    assert parse_serve_args([], environ={"TOKENMILL_API_KEY": "t"}).api_key == "t"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-model-length", "4"], "did you mean --max-model-len?"),
        (["--tensor-parallel-size", "2"], "tensor_parallel_size=2 is not supported"),
        (["--max-model-len", "lots"], "is not a number"),
        (["--chat-template", "missing.jinja"], "neither a file nor a Jinja template"),
        (["a", "--model", "b"], "the model is given twice"),
        (["--generation-config", "/no/such/dir"], "is not auto, vllm or a directory"),
        (["--max-request-body-size", "0"], "--max-request-body-size must be at least 1 byte"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice is not supported: tool calling is not"),
        (["--tool-call-parser", "hermes"], "requests that bring tools get a 400); remove it"),
        (["-pp", "2"], "-pp is not supported: tokenmill runs a model on one device"),
        (["--no-enable-chunked-prefill"], "long prompts are always chunked"),
        (["--override-generation-config", '{"temp": 1}'], "unknown key 'temp'; use temperature, top_p"),
        (["--override-generation-config", '{"top_p": 2}'], "--override-generation-config: top_p must be"),
        (["--override-generation-config", "[1]"], "expected a JSON object"),
    ],
)
def test_errors_name_the_fix(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_serve_args(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


HELP_WITHOUT_TORCH = """
import sys
from tokenmill.entrypoints.cli import main
try:
    main(["serve", "--help"])
except SystemExit:
    pass
sys.exit(int("torch" in sys.modules))
"""


def test_help_lists_flags_without_importing_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, check=False, timeout=60
    )
    assert "--max-model-len" in result.stdout and "--enable-prefix-caching" in result.stdout
    assert result.returncode == 0, "serve --help imported torch"


def test_vllm_server_flags_that_change_nothing_here_are_accepted() -> None:
    args = parse_serve_args(
        [
            "--disable-frontend-multiprocessing",
            "--max-log-len",
            "10",
            "--tokenizer-mode",
            "auto",
            "--chat-template-content-format",
            "string",
            "--disable-uvicorn-access-log",
        ],
        environ={},
    )
    assert args.access_log is False


def test_https_needs_both_files(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_serve_args(["--ssl-keyfile", "k.pem"], environ={})
    assert "--ssl-certfile" in capsys.readouterr().err
    args = parse_serve_args(["--ssl-keyfile", "k", "--ssl-certfile", "c", "--root-path", "/x"], environ={})
    assert (args.ssl_keyfile, args.ssl_certfile, args.root_path) == ("k", "c", "/x")


@pytest.mark.parametrize(
    "flags",
    [["--guided-decoding-backend", "xgrammar"], ["--response-role", "bot"], ["--middleware", "m.Mw"]],
)
def test_vllm_flags_of_missing_features_are_refused_with_the_reason(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_serve_args(flags, environ={})
    assert f"{flags[0]} is not supported:" in capsys.readouterr().err


def test_the_keep_alive_variable_is_vllms() -> None:
    assert not parse_serve_args([], environ={}).keep_alive_on_engine_death
    assert parse_serve_args([], environ={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}).keep_alive_on_engine_death


def test_a_config_file_gives_flags_that_the_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "max_model_len: 4k\nmax-num-seqs: 8\nenable_prefix_caching: false\ntrust_remote_code: true\n"
        "served_model_name: [a, b]\noverride_generation_config: {temperature: 0.5}\nport: 9000\n"
    )
    args = parse_serve_args(["--config", str(config), "--port", "9100"], environ={})
    assert (args.port, args.served_model_names) == (9100, ["a", "b"])
    engine = args.engine_args
    assert (engine.max_model_len, engine.max_num_seqs, engine.enable_prefix_caching) == (4000, 8, False)
    assert args.override_generation_config == {"temperature": 0.5}
    assert parse_serve_args([f"--config={config}"], environ={}).port == 9000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "No such file"),
        ("- a\n", "expected a mapping"),
        ("max_modl_len: 3\n", "did you mean --max-model-len"),
    ],
)
def test_a_bad_config_file_is_a_clear_error(
    text: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config)], environ={})
    assert message in capsys.readouterr().err


def test_several_api_keys_as_in_vllm() -> None:
    args = parse_serve_args(["--api-key", "a", "b"], environ={"VLLM_API_KEY": "env"})
    assert args.api_keys == ["a", "b"] and args.api_key == "a"  # the flag wins over the environment
    assert parse_serve_args([], environ={"VLLM_API_KEY": "env"}).api_keys == ["env"]
    assert parse_serve_args([], environ={}).api_keys == []
