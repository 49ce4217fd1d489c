"""The argument parser of vLLM-style command lines: vLLM's underscore spellings, `--config FILE.yaml`,
unknown flags named with the closest known one, and vLLM's flags for what tokenmill does not do refused
with the reason."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# vLLM flags for what tokenmill does not do: refused with the reason, not with a look-alike flag.
_TOOLS = "tool calling is not supported yet (requests that bring tools get a 400)"
_ONE_DEVICE = "tokenmill runs a model on one device"
_STRUCTURED = "structured output (guided decoding, response_format json) is not supported yet"
UNSUPPORTED_VLLM_FLAGS = {
    "--enable-auto-tool-choice": _TOOLS,
    "--tool-call-parser": _TOOLS,
    "--pipeline-parallel-size": _ONE_DEVICE,
    "-pp": _ONE_DEVICE,
    "--data-parallel-size": _ONE_DEVICE,
    "-dp": _ONE_DEVICE,
    "--no-enable-chunked-prefill": "long prompts are always chunked (--max-num-batched-tokens sets the size)",
    "--enable-lora": "LoRA adapters are not supported yet",
    "--lora-modules": "LoRA adapters are not supported yet",
    "--speculative-config": "speculative decoding is not supported yet",
    "--limit-mm-per-prompt": "tokenmill serves text-only models",
    "--guided-decoding-backend": _STRUCTURED,
    "--structured-outputs-config": _STRUCTURED,
    "--middleware": "the server loads no code named on its command line",
    "--response-role": "chat answers come from the assistant role",
}


def dashed_flag(arg: str) -> str:
    """`--max_model_len=4k` -> `--max-model-len=4k`, as vLLM's parser reads it; values are untouched."""
    if not arg.startswith("--"):
        return arg
    flag, equals, value = arg.partition("=")
    return flag.replace("_", "-") + equals + value


class VllmArgumentParser(argparse.ArgumentParser):
    """Takes vLLM's underscore spellings (`--max_model_len`) too; rejects unknown flags naming the closest
    known one."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        args = self.with_config_file([dashed_flag(arg) for arg in (sys.argv[1:] if args is None else args)])
        parsed, unknown = self.parse_known_args(args, namespace)
        for item in unknown:
            if item.startswith("-"):
                self.error(self.unknown_flag_message(item.split("=", 1)[0]))
        if unknown:
            self.error(f"unexpected argument {unknown[0]!r}")
        return parsed

    def with_config_file(self, args: list[str]) -> list[str]:
        """`--config FILE` (vLLM's): the YAML mapping's flags in its place, so that flags given after it
        on the command line win. `key: true` is the flag alone, `key: false` its `--no-` form (or nothing,
        for a plain switch), a list gives the flag its values."""
        for i, arg in enumerate(args):
            if arg == "--config" or arg.startswith("--config="):
                path = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
                rest = args[i + (1 if "=" in arg else 2) :]
                return [*args[:i], *self.config_file_flags(path), *self.with_config_file(rest)]
        return args

    def config_file_flags(self, path: str) -> list[str]:
        import yaml  # only for --config

        if not path:
            self.error("--config needs a YAML file")
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            self.error(f"--config {path}: {exc}")
        if not isinstance(loaded, dict):
            self.error(f"--config {path}: expected a mapping of flag names to values")
        flags: list[str] = []
        for key, value in loaded.items():
            flag = "--" + str(key).replace("_", "-")
            if value is True:
                flags.append(flag)
            elif value is False:
                negated = "--no-" + flag[2:]  # --no-enable-prefix-caching; a plain switch stays off
                flags += [negated] if negated in self._option_string_actions else []
            elif isinstance(value, list):
                flags += [flag, *(str(item) for item in value)]
            elif value is not None:
                flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
        return flags

    def unknown_flag_message(self, flag: str) -> str:
        if flag in UNSUPPORTED_VLLM_FLAGS:
            return f"{flag} is not supported: {UNSUPPORTED_VLLM_FLAGS[flag]}; remove it"
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
        return f"unknown flag {flag}{hint}"
