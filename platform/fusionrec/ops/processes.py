"""The processes of a local cluster (fusionrec.ops.cluster): each started detached in a session of its
own, known by pid and start time (a pid alone may be reused), stopped with everything in its
session, and named, with its command and log tail, when it fails to start.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Ports handed to servers we start. Not the kernel's ephemeral range (Linux 32768-60999), where
# every outgoing connection takes one: a port picked there was taken by a client of the load
# benchmark before HAProxy bound it. Apart from Ray's worker ports (10002-19999) and Serve's
# replica ports (30000-31000) too.
SERVICE_PORTS = range(20000, 30000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port from SERVICE_PORTS that nothing is bound to right now, on any interface, and that
    this process has not handed out before."""
    for port in random.sample(SERVICE_PORTS, min(500, len(SERVICE_PORTS))):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # fails if anything holds the port, on any address
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {SERVICE_PORTS.start}-{SERVICE_PORTS.stop - 1}")


@dataclass
class Proc:
    """A process we started: its pid and start time (a pid alone may be reused after it exits)."""

    role: str  # "tracking", "head" or "worker-N"
    pid: int
    started: float
    command: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        """Running. An exited child that `up` has not reaped yet (a zombie) has a pid and a start
        time but is no longer running."""
        import psutil

        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def owns_session(self) -> bool:
        """Whether the session this process leads is still ours: the process is (running or a
        zombie), or it is gone. Linux gives no new process a pid that still names a session with
        members, so an exited node's raylet or GCS, left behind in its session, is found by it."""
        import psutil

        try:
            return psutil.Process(self.pid).create_time() == self.started
        except psutil.NoSuchProcess:
            return True

    def exit_code(self) -> int | None:
        """Its exit code if it has exited and is a child of this process (None where unknown);
        waiting reaps it."""
        import psutil

        try:
            return psutil.Process(self.pid).wait(timeout=0)
        except (psutil.TimeoutExpired, psutil.NoSuchProcess):
            return None

    def name(self) -> str:
        if self.role == "tracking":
            return "the MLflow tracking server"
        if self.role == "head":
            return "the Ray head node"
        return f"Ray worker node {self.role.removeprefix('worker-')}"


class StartFailed(RuntimeError):
    """A process of the local cluster failed to start. The message (one line) names it and its log;
    `details` (its command, the log's last lines) is what the CLI prints under it."""

    def __init__(self, message: str, details: list[str]):
        super().__init__(message)
        self.details = details


def start_failed(proc: Proc, what: str, log: Path | None) -> StartFailed:
    """The error for a process that failed to start: what happened, then its command and log tail."""
    return StartFailed(f"{proc.name()} {what}" + (f"; log: {log}" if log else ""),
                       [f"command: {shlex.join(proc.command)}"] + [f"| {line}" for line in log_tail(log)])


def exited(proc: Proc, log: Path | None) -> StartFailed:
    code = proc.exit_code()
    return start_failed(proc, "exited while the cluster was starting"
                        + (f" (exit code {code})" if code is not None else ""), log)


def log_tail(log: Path | None, lines: int = 6) -> list[str]:
    """The last non-blank lines of a log ([] if there is none)."""
    if not log or not log.is_file():
        return []
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))  # Ray colours its log even in a file
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def spawn(role: str, command: list[str], env: dict[str, str], log: Path | None) -> Proc:
    """Start `command` detached in a session of its own: everything it starts (Ray's raylet, GCS,
    workers, which each take a process group of their own) stays in that session."""
    import psutil

    out = open(log, "ab") if log else subprocess.DEVNULL  # the child keeps its own copy
    try:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()
    return Proc(role, process.pid, psutil.Process(process.pid).create_time(), command)


def stop_processes(procs: list[Proc], timeout_s: float = 60) -> int:
    """Stop each process and everything in its session; returns how many processes that was.
    A process whose pid now names another is skipped; one that exited still has its session
    searched (a `ray start` that died can leave its node's processes behind). All are signalled at
    once: a node stopped first only makes the others wait for it."""
    import psutil

    leaders = _processes([p.pid for p in procs if p.alive()])
    members = _session_members(procs)
    for leader in leaders:  # children that took a session of their own (MLflow's job subprocesses)
        try:
            members.update((c.pid, c) for c in leader.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    _signal(leaders, "terminate")  # `ray start --block` stops its node's processes itself
    _, alive = psutil.wait_procs(leaders, timeout=timeout_s)
    members.update(_session_members(procs))  # what a leader started meanwhile, or left behind
    rest = alive + [p for p in members.values() if p.is_running()]
    _signal(rest, "terminate")
    _, alive = psutil.wait_procs(rest, timeout=10)
    _signal(alive, "kill")
    psutil.wait_procs(alive, timeout=10)
    return len(leaders) + len(members)


def _processes(pids: list[int]) -> list:
    import psutil

    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue  # exited since we looked
    return found


def _session_members(procs: list[Proc]) -> dict:
    """The processes in the sessions these processes lead, leaders aside, by pid. Which sessions
    are still theirs is asked anew each time: a pid that was free a minute ago may lead another's
    session now."""
    import psutil

    sessions = {p.pid for p in procs if p.owns_session()}
    members = {}
    for p in psutil.process_iter():
        try:
            if p.pid not in sessions and os.getsid(p.pid) in sessions:
                members[p.pid] = p
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _signal(processes: list, how: str) -> None:
    import psutil

    for p in processes:
        try:
            getattr(p, how)()
        except psutil.NoSuchProcess:
            continue
