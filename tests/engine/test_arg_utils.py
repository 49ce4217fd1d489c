"""EngineArgs: sizes as on the command line, and every out-of-range option refused by name."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill.engine.arg_utils import EngineArgs, parse_human_int


def test_sizes_accept_the_command_lines_suffixes() -> None:
    args = EngineArgs(kv_cache_memory="4GiB", max_model_len="1.5k")  # type: ignore[arg-type]
    assert (args.kv_cache_memory, args.max_model_len) == (4 << 30, 1500)
    assert parse_human_int("32K") == 32768 and parse_human_int(7) == 7
    with pytest.raises(ValueError, match="kv_cache_memory: 'lots' is not a number"):
        EngineArgs(kv_cache_memory="lots")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", 0),
        ("block_size", 0),
        ("max_waiting", -1),
        ("max_waiting", 1.5),
        ("max_num_seqs", 2.5),
        ("max_model_len", 0),
        ("max_model_len", -5),
        ("kv_cache_memory", -5),
        ("gpu_memory_utilization", 0.0),
        ("gpu_memory_utilization", 1.5),
    ],
)
def test_out_of_range_options_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        EngineArgs(**{field: value}).create_engine_config()


def test_defaults_make_a_config() -> None:
    config = EngineArgs().create_engine_config()
    assert config.scheduler.max_num_seqs == 256 and config.cache.kv_cache_memory is None
