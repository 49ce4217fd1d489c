"""Clients that drop their streams mid-way abort their requests: every KV block comes back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

NUM_DROPPED = 20
SETTLE_TIMEOUT_S = 120


def scrape(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_and_labels, value = line.rsplit(" ", 1)
            values[name_and_labels.split("{")[0]] = float(value)
    return values


async def drop_mid_stream(server, index: int) -> None:
    body = {
        "prompt": f"Story number {index}: once upon a time",
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": "Bearer test-key"}
    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                return  # leaves with the stream half read: the connection closes


async def drop_while_waiting(server, index: int) -> None:
    """A non-streamed request whose client gives up before the answer comes."""
    body = {"prompt": f"Letter number {index}: dear", "max_tokens": 500, "ignore_eos": True}
    headers = {"Authorization": "Bearer test-key"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=1.0) as http:
        with pytest.raises(httpx.TimeoutException):
            await http.post("/v1/completions", json=body)


def test_dropped_streams_free_their_blocks(server) -> None:
    log_before = server.log.read_text(errors="replace")

    async def drop_all() -> None:
        await asyncio.gather(
            *(drop_mid_stream(server, i) for i in range(NUM_DROPPED)),
            *(drop_while_waiting(server, i) for i in range(4)),
        )

    asyncio.run(drop_all())
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    metrics = scrape(server)
    while time.monotonic() < deadline:
        metrics = scrape(server)
        idle = metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0
        if idle and metrics["tokenmill:num_free_blocks"] == metrics["tokenmill:num_total_blocks"]:
            break
        time.sleep(0.5)
    assert metrics["tokenmill:num_total_blocks"] > 0
    assert metrics["tokenmill:num_free_blocks"] == metrics["tokenmill:num_total_blocks"]
    assert metrics["vllm:num_requests_running"] == 0

    reply = server.client().completions.create(model="smol", prompt="Hello", max_tokens=2, temperature=0)
    assert reply.choices[0].text
    # A client that leaves is not a server error: nothing is logged as one.
    new_log = server.log.read_text(errors="replace")[len(log_before) :]
    assert "Traceback" not in new_log and "unexpected error" not in new_log
