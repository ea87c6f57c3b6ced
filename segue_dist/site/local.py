"""A ``scheduler: local`` site: run each "node"'s launcher on this machine and supervise them as one job."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from segue_dist.site.commands import Tools, node_command
from segue_dist.site.config import SiteConfig
from segue_dist.site.paths import site_path
from segue_dist.site.plan import plan_stage


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_commands(site: SiteConfig, stage: str, args: list[str], port: int) -> list[list[str]]:
    plan = plan_stage(site, stage)
    tools = Tools.here(site.env.container)
    address = site.main_address or "127.0.0.1"
    commands = [node_command(plan, node, address, port, args, tools) for node in range(plan.nodes)]
    if site.env.setup:  # set-up lines need a shell; the launcher replaces it (exec) so signals reach it
        setup = "; ".join(site.env.setup)
        commands = [["bash", "-c", f"{setup}; exec {shlex.join(cmd)}"] for cmd in commands]
    return commands


def submit_local(site: SiteConfig, stage: str, args: list[str], dry_run: bool) -> int:
    """Run the stage here: one launcher per "node", each node's output in its own log."""
    port = site.main_process_port or free_port()
    commands = local_commands(site, stage, args, port)
    if dry_run:
        for node, cmd in enumerate(commands):
            print(f"# node {node}\n{shlex.join(cmd)}")
        return 0
    env = {**os.environ, **site.env.vars, "PYTHONUNBUFFERED": "1"}
    workdir = site_path(site, "workdir")
    if len(commands) == 1:
        return subprocess.run(commands[0], cwd=workdir, env=env, check=False).returncode
    logs = site_path(site, "logs")
    logs.mkdir(parents=True, exist_ok=True)
    return run_local_nodes(commands, workdir, env, [logs / f"{stage}-node{n}.log" for n in range(len(commands))], port)


def run_local_nodes(commands: list[list[str]], workdir: Path, env: dict[str, str], logs: list[Path], port: int) -> int:
    """Start node 0, wait until its rendezvous store listens, start the others; stop them all if one fails.

    The order matters only on one machine: every launcher here sees 127.0.0.1 as its own address, so a node 1
    started first would take node 0's port as the store server, and node 0's launcher would refuse the port as taken.
    """
    procs: list[subprocess.Popen] = []
    files = [open(log, "w", encoding="utf-8") for log in logs]  # noqa: SIM115 - closed in finally
    try:
        for node, (cmd, log) in enumerate(zip(commands, files, strict=True)):
            # Own session per node: stopping a node stops its launcher's ranks too.
            procs.append(
                subprocess.Popen(
                    cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            if node == 0:
                wait_for_listener(port, procs[0])
        codes = wait_all(procs)
    finally:
        stop(procs)
        for log in files:
            log.close()
    for node, code in enumerate(codes):
        print(f"node {node}: {'ok' if code == 0 else f'FAILED (exit {code})'}; log {logs[node]}")
    for node, code in enumerate(codes):
        if code != 0:
            tail = logs[node].read_text(encoding="utf-8", errors="replace")[-3000:]
            print(f"--- node {node} log tail ---\n{tail}", file=sys.stderr)
    return 0 if all(code == 0 for code in codes) else 1


def port_taken(port: int) -> bool:
    """Whether something listens on the port, probed by binding it (never by connecting to the store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_for_listener(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not port_taken(port):
        time.sleep(0.2)


def wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Exit codes of all nodes; once one node fails the others are stopped (their rendezvous would wait 15 min)."""
    while True:
        codes = [p.poll() for p in procs]  # poll every node: any() would stop at the first still running
        if all(code is not None for code in codes):
            return codes
        if any(code not in (None, 0) for code in codes):
            stop(procs)
            return [p.wait() for p in procs]
        time.sleep(0.5)


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop each node's session (launcher and ranks). A session outlives its reaped leader only while members of
    it remain, and its id is not reused meanwhile, so this signals nothing but what these launchers started."""
    for proc in procs:
        _signal_session(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_session(proc, signal.SIGKILL)
            proc.wait()
    # The ranks (the launchers' children) get the signal too and may outlive their launcher by a moment.
    while any(_session_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        _signal_session(proc, signal.SIGKILL)


def _session_alive(proc: subprocess.Popen) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole session has already exited
        os.killpg(proc.pid, sig)
