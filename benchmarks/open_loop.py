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
import random
import time
from pathlib import Path
from typing import Annotated

import aiohttp
import numpy as np
import typer


def schedule(rate: float, seconds: float, arrivals: str = "uniform", rng: random.Random | None = None) -> list[float]:
    """Send times (s from the start) at `rate` for `seconds`: evenly spaced, or Poisson (exponential gaps)."""
    if arrivals == "uniform":
        return [n / rate for n in range(int(rate * seconds))]
    rng = rng or random.Random(0)
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    """The answer's status; 0 when none came (refused, reset, timed out)."""
    try:
        async with session.post(url, json=body) as response:
            await response.read()
            return response.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


def session_for(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def open_loop(requests: list[tuple[str, dict]], times: list[float], connections: int = 0,
                    timeout_s: float = 60.0) -> tuple[list[tuple[float, float, int]], float, float]:
    """Send requests[n] (url, body) at start + times[n]: rows (scheduled s, latency s from the
    scheduled time, status) in order of sending, the largest lag behind the schedule (s), and
    `start` (time.monotonic(), a clock other processes share). connections=0: no limit."""
    rows: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(times)
    lag = 0.0

    async def send(n: int, at: float, url: str, body: dict) -> None:
        status = await post(session, url, body)
        rows[n] = (at - start, time.monotonic() - at, status)

    async with session_for(connections, timeout_s) as session:
        start, tasks = time.monotonic() + 0.05, []
        for n, (offset, (url, body)) in enumerate(zip(times, requests, strict=True)):
            at = start + offset
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            lag = max(lag, time.monotonic() - at)
            tasks.append(asyncio.create_task(send(n, at, url, body)))
        await asyncio.gather(*tasks)
    return rows, lag, start


def percentiles(latency_s: list[float]) -> dict:
    """p50 / p95 / p99 of latencies in seconds, as milliseconds."""
    ms = np.array(latency_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}


def summary(rows: list[tuple[float, float, int]], seconds: float) -> dict:
    """Answered rate, latency percentiles (ms, from the scheduled time) and failures."""
    if not rows:
        return {"requests": 0}
    ok = sum(200 <= r[2] < 300 for r in rows)
    return {"requests": len(rows), "answered_per_s": ok / seconds, **percentiles([r[1] for r in rows]),
            "failed": len(rows) - ok}


def main(base: str,
         requests: Annotated[Path, typer.Option(help="JSON list of [path, body] pairs, sent in turn.")],
         rate: Annotated[float, typer.Option(help="Requests per second.")],
         seconds: Annotated[float, typer.Option(help="How long to send.")],
         out: Annotated[Path | None, typer.Option(help="Where to write every request's row (JSON).")] = None,
         timeout_s: float = 60.0) -> None:
    pairs = [(base.rstrip("/") + path, body) for path, body in json.loads(requests.read_text())]
    times = schedule(rate, seconds)
    rows, lag, start = asyncio.run(open_loop([pairs[n % len(pairs)] for n in range(len(times))], times,
                                             timeout_s=timeout_s))
    if out is not None:
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text(json.dumps(rows))
        os.replace(partial, out)
    print(json.dumps({"rate": rate, "seconds": seconds, "started_at": start, "lag_ms": lag * 1000,
                      **summary(rows, seconds)}))


if __name__ == "__main__":
    typer.run(main)
