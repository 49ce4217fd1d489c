"""What the offline benchmarks share: vLLM's engine flags, the engine they build, random token prompts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Any

from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.entrypoints.cli_args import add_engine_flags, engine_args_from
from tokenmill.entrypoints.vllm_parser import VllmArgumentParser

# Token ids below this are left out of random prompts: most vocabularies put their special tokens there.
FIRST_PROMPT_ID = 100


def make_parser(prog: str, description: str | None) -> VllmArgumentParser:
    """A parser with every engine flag of `tokenmill serve` (--model, --dtype, --max-model-len, ...)."""
    parser = VllmArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_engine_flags(parser)
    return parser


def parse_engine_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags, with `engine_args` (checked, as the server checks them) added."""
    args = parser.parse_args(argv)
    args.engine_args = engine_args_from(args, parser.error)
    return args


def require_at_least(
    parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict[str, int]
) -> None:
    """A flag error for the first of `minimums` (destination -> least value) that `args` holds less of."""
    for dest, minimum in minimums.items():
        if getattr(args, dest) < minimum:
            parser.error(f"--{dest.replace('_', '-')} must be at least {minimum}")


def build_llm(engine_args: EngineArgs) -> Any:  # an LLM (imported here: it loads torch)
    from tokenmill import LLM

    values = {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(EngineArgs)}
    return LLM(**values)


def check_context(llm: Any, prog: str, longest_prompt: int, output_len: int) -> None:
    """Exits (code 2, as a flag error) when the workload's longest request does not fit the context."""
    limit = llm.engine.core.max_model_len
    if longest_prompt + output_len > limit:
        print(
            f"{prog}: error: prompts of up to {longest_prompt} tokens and --output-len {output_len} need a "
            f"context of {longest_prompt + output_len} tokens, but the engine serves {limit}: shorten them "
            "or raise --max-model-len",
            file=sys.stderr,
        )
        raise SystemExit(2)


def random_prompts(vocab_size: int, lengths: list[int], rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(FIRST_PROMPT_ID, vocab_size) for _ in range(n)] for n in lengths]


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """--output-json: the report as one JSON file, written whole (a temporary file renamed over it)."""
    if path is None:
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(target)
