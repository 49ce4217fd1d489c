"""Flags with vLLM's names: `tokenmill serve`'s, and the offline benchmarks' engine flags, generated from
the `EngineArgs` fields; the server adds its own.

This is where the entrypoints read the environment (`VLLM_API_KEY`, `TOKENMILL_API_KEY`,
`VLLM_KEEP_ALIVE_ON_ENGINE_DEATH`). Numbers accept vLLM's suffixes: lowercase k/m/g are decimal (32k =
32000), uppercase K/M/G binary (32K = 32768), and byte sizes also take KB/MB/GB (decimal) or KiB/MiB/GiB
(binary).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.config import Dtype
from tokenmill.engine import arg_utils
from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.entrypoints.vllm_parser import VllmArgumentParser
from tokenmill.sampling_params import GENERATION_CONFIG_KEYS, SamplingParams, from_generation_config

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BODY_SIZE = 16 << 20
API_KEY_ENV_VARS = ("VLLM_API_KEY", "TOKENMILL_API_KEY")
KEEP_ALIVE_ENV_VAR = "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH"


def parse_human_int(value: str) -> int:
    """`arg_utils.parse_human_int` for argparse, which shows an ArgumentTypeError's message as it is."""
    try:
        return arg_utils.parse_human_int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (the --help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs


def _converter(name: str, annotation: str) -> dict[str, Any]:
    """argparse keyword arguments for an EngineArgs field from its (string) annotation."""
    if name == "kv_cache_memory" or annotation in ("int", "int | None"):
        return {"type": parse_human_int}
    if annotation == "float":
        return {"type": float}
    if annotation in ("bool", "bool | None"):
        return {"action": argparse.BooleanOptionalAction}
    if annotation == "Dtype":
        return {"choices": typing.get_args(Dtype)}
    if annotation.startswith("dict"):
        return {"type": _json_object}
    return {"type": str}


_FIELD_OVERRIDES: dict[str, dict[str, Any]] = {
    "served_model_name": {"nargs": "+", "type": str},
    "device": {"choices": ("auto", "cpu", "cuda"), "type": str},
}
_FIELD_ALIASES = {"tensor_parallel_size": ["-tp"]}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (`tokenmill serve` and the offline benchmarks, as vLLM's)."""
    docs = _field_docs(EngineArgs)
    group = parser.add_argument_group("engine")
    defaults = EngineArgs()
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        kwargs = _converter(f.name, str(f.type)) | _FIELD_OVERRIDES.get(f.name, {})
        default = getattr(defaults, f.name)
        help_text = docs.get(f.name, "")
        if default not in (None, {}, False) and "action" not in kwargs:
            help_text += f" (default: {default})"
        group.add_argument(
            *_FIELD_ALIASES.get(f.name, []), flag, dest=f.name, default=default, help=help_text, **kwargs
        )


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    add = group.add_argument
    add("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    add("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})")
    add(
        "--api-key",
        nargs="+",
        default=None,
        help="require one of these bearer keys on the API (also VLLM_API_KEY, TOKENMILL_API_KEY)",
    )
    add("--chat-template", default=None, help="a Jinja chat template: a file path or the template itself")
    add(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests bring their own chat_template (it runs on the server: trusted clients only)",
    )
    add(
        "--generation-config",
        default="auto",
        help="sampling defaults: auto (the model's generation config), vllm (none), or a directory",
    )
    add(
        "--override-generation-config",
        type=_json_object,
        default={},
        help="sampling defaults over --generation-config's, as JSON: "
        '\'{"temperature": 0.5, "max_new_tokens": 512}\' (keys: ' + ", ".join(GENERATION_CONFIG_KEYS) + ")",
    )
    add(
        "--max-request-body-size",
        type=parse_human_int,
        default=DEFAULT_MAX_REQUEST_BODY_SIZE,
        help="largest request body accepted, in bytes (accepts 64MiB); larger get a 413 (default: 16MiB)",
    )
    add("--allowed-origins", type=_origins, default=[], help="CORS origins, a JSON list or comma-separated")
    add(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs a request may ask for; -1: no limit (default: 20)",
    )
    add(
        "--reasoning-parser",
        choices=("deepseek_r1",),
        default=None,
        help="split <think>...</think> into reasoning_content",
    )
    add(
        "--uvicorn-log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn's log level (default: warning; info also logs each request line)",
    )
    add(
        "--disable-fastapi-docs",
        action="store_true",
        help="serve no API description (/docs, /redoc, /openapi.json)",
    )
    add("--enable-log-requests", action="store_true", help="log one line per request")
    add("--disable-log-requests", action="store_true", help="do not log requests (the default)")
    add(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="logprobs name their tokens `token_id:N` (a request can ask so itself)",
    )
    add(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage says how many prompt tokens came from the prefix cache (prompt_tokens_details)",
    )
    add(
        "--enable-force-include-usage",
        action="store_true",
        help="every stream ends with a usage chunk, asked for or not",
    )
    add("--config", default=None, help="a YAML file of flags (`max_model_len: 8k`); flags after it win")
    add("--ssl-keyfile", default=None, help="serve HTTPS with this private key (with --ssl-certfile)")
    add("--ssl-certfile", default=None, help="serve HTTPS with this certificate (with --ssl-keyfile)")
    add(
        "--root-path",
        default=None,
        help="the path prefix a proxy in front of the server strips (ASGI root_path)",
    )
    add(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="no line per HTTP request, even with --uvicorn-log-level info",
    )
    # Accepted so vLLM command lines work unchanged; neither changes what tokenmill does.
    add(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM compatibility: tokenmill never runs code from a model repository",
    )
    add(
        "--disable-log-stats", action="store_true", help="accepted for vLLM compatibility (no periodic stats)"
    )
    add(
        "--enable-chunked-prefill",
        action="store_true",
        help="accepted for vLLM compatibility: long prompts are always chunked (--max-num-batched-tokens)",
    )
    add(
        "--swap-space",
        type=float,
        default=None,
        help="accepted for vLLM compatibility: preempted requests are recomputed, never swapped out",
    )
    add(
        "--disable-custom-all-reduce",
        action="store_true",
        help="accepted for vLLM compatibility (one device: nothing to reduce)",
    )
    add(
        "--distributed-executor-backend",
        default=None,
        help="accepted for vLLM compatibility (one device: no workers to distribute)",
    )
    add(
        "--disable-frontend-multiprocessing",
        action="store_true",
        help="accepted for vLLM compatibility (the engine core always runs in its own process)",
    )
    add(
        "--max-log-len",
        type=int,
        default=None,
        help="accepted for vLLM compatibility (request log lines never hold prompts)",
    )
    add(
        "--tokenizer-mode",
        choices=("auto", "hf"),
        default="auto",
        help="accepted for vLLM compatibility: the Hugging Face tokenizer (vLLM's auto and hf)",
    )
    add(
        "--chat-template-content-format",
        choices=("auto", "string"),
        default="auto",
        help="accepted for vLLM compatibility: text content parts reach the template joined as a string",
    )


def _origins(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        if not isinstance(parsed, list):
            raise argparse.ArgumentTypeError("expected a JSON list of origins")
        return [str(origin) for origin in parsed]
    return [origin.strip() for origin in value.split(",") if origin.strip()]


def make_serve_parser() -> VllmArgumentParser:
    parser = VllmArgumentParser(
        prog="tokenmill serve",
        usage="tokenmill serve [MODEL] [FLAGS]  (tokenmill serve --help lists them)",
        description="Serve a model over an OpenAI-compatible HTTP API (vLLM's flags and meanings).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        help="model: HF directory, .gguf file or hub id (default: embedded)",
    )
    add_engine_flags(parser)
    _add_server_flags(parser)
    return parser


@dataclass
class ServeArgs:
    """Everything `tokenmill serve` was asked for."""

    engine_args: EngineArgs
    served_model_names: list[str]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: list[str] = field(default_factory=list)  # any one of them lets a request in; none: open
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] = field(default_factory=dict)
    allowed_origins: list[str] = field(default_factory=list)
    max_logprobs: int = 20
    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE
    reasoning_parser: str | None = None
    uvicorn_log_level: str = "warning"
    enable_log_requests: bool = False
    disable_fastapi_docs: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    root_path: str | None = None
    access_log: bool = True
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    keep_alive_on_engine_death: bool = False
    """Stay up answering 503 after the engine core dies, instead of exiting for a supervisor to restart
    it (vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH)."""

    @property
    def api_key(self) -> str | None:
        """The first key (the only one, usually)."""
        return self.api_keys[0] if self.api_keys else None


def api_keys_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The keys in VLLM_API_KEY (else TOKENMILL_API_KEY): one, as in vLLM, or several, one a line (how
    the appliance passes VLLM_ARGS' `--api-key a b`; no key can hold a newline)."""
    env = os.environ if environ is None else environ
    value = next((env[name] for name in API_KEY_ENV_VARS if env.get(name)), "")
    return [key for key in value.splitlines() if key]


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    return next(iter(api_keys_from_env(environ)), None)


def parse_serve_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, error: Callable[[str], Any] | None = None
) -> ServeArgs:
    """Parses `serve` flags; invalid combinations exit with a message (argparse's usual code 2)."""
    parser = make_serve_parser()
    ns = parser.parse_args(list(argv))
    fail = error or parser.error
    if ns.model_tag is not None:
        if ns.model is not None and ns.model != ns.model_tag:
            fail(f"the model is given twice ({ns.model_tag!r} and --model {ns.model!r}); pass one")
        ns.model = ns.model_tag
    names: list[str] = ns.served_model_name or []
    engine_args = engine_args_from(ns, fail)
    if ns.max_request_body_size < 1:
        fail(f"--max-request-body-size must be at least 1 byte, got {ns.max_request_body_size}")
    if ns.generation_config not in ("auto", "vllm") and not Path(ns.generation_config).is_dir():
        fail(f"--generation-config {ns.generation_config!r} is not auto, vllm or a directory")
    check_generation_overrides(ns.override_generation_config, fail)
    if (ns.ssl_keyfile is None) != (ns.ssl_certfile is None):
        fail("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    env = os.environ if environ is None else environ
    api_keys = ns.api_key or api_keys_from_env(env)
    return ServeArgs(
        engine_args=engine_args,
        served_model_names=names,
        host=ns.host,
        port=ns.port,
        api_keys=api_keys,
        chat_template=load_chat_template(ns.chat_template, fail),
        trust_request_chat_template=ns.trust_request_chat_template,
        generation_config=ns.generation_config,
        override_generation_config=ns.override_generation_config,
        allowed_origins=ns.allowed_origins,
        max_logprobs=ns.max_logprobs,
        max_request_body_size=ns.max_request_body_size,
        reasoning_parser=ns.reasoning_parser,
        uvicorn_log_level=ns.uvicorn_log_level,
        enable_log_requests=ns.enable_log_requests and not ns.disable_log_requests,
        disable_fastapi_docs=ns.disable_fastapi_docs,
        ssl_keyfile=ns.ssl_keyfile,
        ssl_certfile=ns.ssl_certfile,
        root_path=ns.root_path,
        access_log=not ns.disable_uvicorn_access_log,
        return_tokens_as_token_ids=ns.return_tokens_as_token_ids,
        enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
        enable_force_include_usage=ns.enable_force_include_usage,
        keep_alive_on_engine_death=env.get(KEEP_ALIVE_ENV_VAR, "").strip().lower() in ("1", "true", "yes"),
    )


def engine_args_from(ns: argparse.Namespace, fail: Callable[[str], Any]) -> EngineArgs:
    """The EngineArgs of `add_engine_flags`' flags, checked as the engine will check them."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)}
    names: list[str] = values.pop("served_model_name") or []
    engine_args = EngineArgs(**values, served_model_name=names[0] if names else None)
    try:
        engine_args.create_engine_config()
    except ValueError as err:
        fail(str(err))
    return engine_args


def check_generation_overrides(overrides: dict[str, Any], fail: Callable[[str], Any]) -> None:
    """--override-generation-config: known keys, and values every request could be sampled with."""
    unknown = sorted(set(overrides) - set(GENERATION_CONFIG_KEYS))
    if unknown:
        keys = ", ".join(GENERATION_CONFIG_KEYS)
        fail(f"--override-generation-config: unknown key {unknown[0]!r}; use {keys}")
        return
    try:
        SamplingParams(**from_generation_config(overrides)).validate()
    except (TypeError, ValueError) as err:
        fail(f"--override-generation-config: {err}")


def load_chat_template(value: str | None, fail: Callable[[str], Any]) -> str | None:
    """--chat-template: a file's contents, or the value itself when it is a Jinja template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    fail(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return None
