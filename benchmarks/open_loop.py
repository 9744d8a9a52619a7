"""Open-loop load: requests sent on a fixed schedule, whatever the server's answers.

A closed-loop client waits for each answer before sending the next request, so a slow server is
offered less load and its queueing never shows (coordinated omission). Here request n is sent at
start + n / rate, and its latency is counted from that scheduled time: a request the client could
not send on time (because the machine was busy) is charged for the wait too, and `lag_ms` says
how far behind the schedule the sender fell.

    .venv/bin/python benchmarks/open_loop.py http://127.0.0.1:8000 --requests requests.json \\
        --rate 50 --seconds 20 --out rows.json

requests.json is a list of [path, body] pairs, sent in turn. rows.json (written at the end, via a
temporary file) holds one [scheduled s, latency s, status] row per request (status 0: no
answer); the last line printed is a JSON summary, with `started_at`, the schedule's start on
time.monotonic() (on Linux one clock for every process, so another process can place its own
events on the schedule).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated

import aiohttp
import numpy as np
import typer


async def open_loop(base: str, requests: list[tuple[str, dict]], rate: float, seconds: float,
                    timeout_s: float = 60.0) -> tuple[list[tuple[float, float, int]], float, float]:
    """Send requests[n % len] at start + n / rate for `seconds`: rows (scheduled, latency, status), the
    largest lag behind the schedule, and `start` (time.monotonic(), a clock other processes share)."""
    rows: list[tuple[float, float, int]] = []
    lag = 0.0
    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests in flight: never queue here

    async def send(session: aiohttp.ClientSession, at: float, path: str, body: dict) -> None:
        try:
            async with session.post(base + path, json=body) as response:
                await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError):
            status = 0
        rows.append((at - start, time.monotonic() - at, status))

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.monotonic()
        tasks = []
        for n in range(int(rate * seconds)):
            at = start + n / rate
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            lag = max(lag, time.monotonic() - at)
            tasks.append(asyncio.create_task(send(session, at, *requests[n % len(requests)])))
        await asyncio.gather(*tasks)
    return sorted(rows), lag, start


def summary(rows: list[tuple[float, float, int]], seconds: float) -> dict:
    """Answered rate, latency percentiles (ms, from the scheduled time) and failures."""
    if not rows:
        return {"requests": 0}
    latency = np.array([r[1] for r in rows]) * 1000
    return {"requests": len(rows), "answered_per_s": sum(200 <= r[2] < 300 for r in rows) / seconds,
            "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95)),
            "p99_ms": float(np.percentile(latency, 99)), "failed": sum(not 200 <= r[2] < 300 for r in rows)}


def main(base: str,
         requests: Annotated[Path, typer.Option(help="JSON list of [path, body] pairs, sent in turn.")],
         rate: Annotated[float, typer.Option(help="Requests per second.")],
         seconds: Annotated[float, typer.Option(help="How long to send.")],
         out: Annotated[Path | None, typer.Option(help="Where to write every request's row (JSON).")] = None,
         timeout_s: float = 60.0) -> None:
    pairs = [(path, body) for path, body in json.loads(requests.read_text())]
    rows, lag, start = asyncio.run(open_loop(base.rstrip("/"), pairs, rate, seconds, timeout_s))
    if out is not None:
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text(json.dumps(rows))
        os.replace(partial, out)
    print(json.dumps({"rate": rate, "seconds": seconds, "started_at": start, "lag_ms": lag * 1000,
                      **summary(rows, seconds)}))


if __name__ == "__main__":
    typer.run(main)
