"""Open-loop load: requests sent on a fixed schedule, whatever the server's answers.

A closed-loop client waits for each answer before sending the next request, so a slow server is
offered less load and its queueing never shows (coordinated omission). Here request n is sent at
start + n / rate, and its latency is counted from that scheduled time: a request the client could
not send on time (because the machine was busy) is charged for the wait too, and `lag_ms` says
how far behind the schedule the sender fell.

    .venv/bin/python benchmarks/open_loop.py http://127.0.0.1:8000 --requests requests.json \\
        (--rate 50 --seconds 20 | --schedule times.json) [--connections N] --out rows.json

requests.json is a list of [path, body] pairs, sent in turn; times.json, if given, the send times
(s from the start) instead of evenly spaced ones at --rate for --seconds. rows.json (written at the end, via a
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
import subprocess
import sys
import tempfile
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


def open_loop_apart(base: str, requests: list[tuple[str, dict]], times: list[float], connections: int = 0,
                    timeout_s: float = 60.0) -> tuple[list[tuple[float, float, int]], float]:
    """open_loop() in a process of its own (this file's CLI): requests are (path, body) pairs sent to
    `base`. In the caller's process a busy thread (sampling serve.status(), say), or a Ray driver's,
    would hold the GIL the sender needs, and charge its waits to the server. Returns the rows and
    the largest lag (s)."""
    with tempfile.TemporaryDirectory() as folder:
        files = {name: Path(folder) / f"{name}.json" for name in ("requests", "schedule", "rows")}
        files["requests"].write_text(json.dumps(requests))
        files["schedule"].write_text(json.dumps(times))
        done = subprocess.run([sys.executable, __file__, base, "--requests", str(files["requests"]),
                               "--schedule", str(files["schedule"]), "--connections", str(connections),
                               "--timeout-s", str(timeout_s), "--out", str(files["rows"])],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the load generator failed: {done.stderr.strip()[-2000:]}")
        return json.loads(files["rows"].read_text()), json.loads(done.stdout.splitlines()[-1])["lag_ms"] / 1000


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
         rate: Annotated[float, typer.Option(help="Requests per second.")] = 0.0,
         seconds: Annotated[float, typer.Option(help="How long to send.")] = 0.0,
         schedule_file: Annotated[Path | None, typer.Option(
             "--schedule", help="JSON list of send times (s from the start), instead of --rate/--seconds.")] = None,
         connections: Annotated[int, typer.Option(help="Most connections at once (0: no limit).")] = 0,
         out: Annotated[Path | None, typer.Option(help="Where to write every request's row (JSON).")] = None,
         timeout_s: float = 60.0) -> None:
    if schedule_file is not None:
        times = json.loads(schedule_file.read_text())
        seconds = seconds or (times[-1] if times else 0.0)
    elif rate > 0 and seconds > 0:
        times = schedule(rate, seconds)
    else:
        raise typer.BadParameter("give --rate and --seconds, or --schedule")
    pairs = [(base.rstrip("/") + path, body) for path, body in json.loads(requests.read_text())]
    rows, lag, start = asyncio.run(open_loop([pairs[n % len(pairs)] for n in range(len(times))], times,
                                             connections, timeout_s))
    if out is not None:
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text(json.dumps(rows))
        os.replace(partial, out)
    print(json.dumps({"rate": rate, "seconds": seconds, "started_at": start, "lag_ms": lag * 1000,
                      **summary(rows, seconds)}))


if __name__ == "__main__":
    typer.run(main)
