"""`make bench`'s one-client comparison in turn: each server answers while every other is paused.

The servers are tiny real HTTP servers in sessions of their own (below the boundary this is about:
which server runs when); each notes, as it answers, whether the other was stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.machine import signal_session
from benchmarks.run import Collector, one_client_in_turn, request_mix
from benchmarks.run_report import ONE_CLIENT_IN_TURN
from benchmarks.systems import RunningServer, ServerSystem
from tests.conftest import free_port
from tests.polling import wait_until

# Answers every POST with 200; notes, per request, the state of the process whose pid is in the
# file OTHER_PID_FILE names (T: stopped). Starts a child in a process group of its own, as Ray's
# processes are, and prints its pid.
SERVER = """
import http.server, os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], process_group=0)
print(child.pid, flush=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        other = open(os.environ["OTHER_PID_FILE"]).read().strip()
        state = open(f"/proc/{other}/stat").read().rsplit(")", 1)[1].split()[0]
        with open(os.environ["LOG"], "a") as log:
            log.write(state + "\\n")
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def start(port: int, other_pid_file: Path, log: Path) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "OTHER_PID_FILE": str(other_pid_file), "LOG": str(log)}
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[dict[str, tuple[RunningServer, int, Path]]]:
    """Two servers, each with its port, a child in another process group, and its log."""
    processes = []
    servers = {}
    names = ("a", "b")
    for name, other in zip(names, reversed(names), strict=True):
        port = free_port()
        process, child = start(port, tmp_path / f"{other}.pid", tmp_path / f"{name}.log")
        (tmp_path / f"{name}.pid").write_text(str(process.pid))
        processes.append(process)
        system = ServerSystem(name=name, label=name, command=[], ready_line="")
        server = RunningServer(system, f"http://127.0.0.1:{port}", 0.0, [], process.pid)
        servers[name] = (server, child, tmp_path / f"{name}.log")
    try:
        yield servers
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            assert process.stdout is not None
            process.stdout.close()


def test_signal_session_pauses_and_resumes_every_process_of_a_session(
    two_servers: dict[str, tuple[RunningServer, int, Path]],
) -> None:
    server, child, _ = two_servers["a"]
    assert os.getpgid(child) != server.session  # not reachable through the process group
    signal_session(server.session, signal.SIGSTOP)
    wait_until(lambda: state(server.session) == state(child) == "T", "both processes stopped", deadline_s=10)
    signal_session(server.session, signal.SIGCONT)
    wait_until(lambda: "T" not in (state(server.session), state(child)), "both resumed", deadline_s=10)


def test_each_server_answers_its_turn_while_the_other_is_paused(
    two_servers: dict[str, tuple[RunningServer, int, Path]],
) -> None:
    turns = 3
    args = argparse.Namespace(
        seed=0, timeout=10.0, drain=1.0, one_client_turns=turns, size="64x64", endpoint="generations",
        api_key=[], stream_fraction=0.0, partial_images=2, n=1, model=None,
    )  # fmt: skip
    collector = Collector(slo_s=1.0)
    servers = {name: server for name, (server, _, _) in two_servers.items()}
    asyncio.run(one_client_in_turn(args, servers, request_mix(args), collector))

    for name, (server, child, log) in two_servers.items():
        scenario, rounds = collector.runs[(name, ONE_CLIENT_IN_TURN)]
        assert scenario.mode == "in-turn"
        assert [record.ok for record in rounds[0]] == [True] * turns
        # After the warm-up's three requests (both running), the other was stopped at every turn.
        assert log.read_text().split()[-turns:] == ["T"] * turns
        assert "T" not in (state(server.session), state(child))  # both resumed at the end
    starts = sorted((record.start_s, record.system) for record in collector.records)
    assert [system for _, system in starts] == ["a", "b"] * turns
