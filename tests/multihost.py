"""Runs a command-line entry as several JAX processes on this machine (multi-host, on CPU).

Each process gets `devices_per_process` fake CPU devices and joins a job coordinated on a free
local port (`jax.distributed.initialize` through the entries' `--coordinator_address`,
`--num_processes` and `--process_id` flags), so 2 x 4 processes make one 8-device mesh, as
2 hosts of a pod slice or 2 GPU nodes would. Collectives between processes go through gloo.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Finished:
    returncodes: list[int]
    outputs: list[str]

    def check(self):
        bad = [i for i, rc in enumerate(self.returncodes) if rc != 0]
        if bad:
            details = "\n".join(f"--- process {i} (exit {self.returncodes[i]}), last lines:\n"
                                f"{_tail(self.outputs[i])}" for i in bad)
            raise AssertionError(f"processes {bad} failed:\n{details}")
        return self


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_single(argv: list[str], *, devices: int = 8, timeout: float = 900) -> Finished:
    """`python <argv>` as one process with `devices` fake CPU devices (the reference run)."""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(devices), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Finished([proc.returncode], [proc.stdout])


def run_processes(argv: list[str], *, num_processes: int = 2, devices_per_process: int = 4,
                  timeout: float = 900, on_start=None) -> Finished:
    """`python <argv>` as `num_processes` processes of one job; waits for all of them.

    A process still running after `timeout` seconds (a hang: a collective one process never
    joined, a barrier not reached) fails the caller with every process's last output lines.
    `on_start(procs)` is called once they are started (e.g. to signal one of them later).
    """
    port = free_port()
    procs, logs = [], []
    for i in range(num_processes):
        log = open(_log_path(port, i), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, *argv, f"--coordinator_address=localhost:{port}",
             f"--num_processes={num_processes}", f"--process_id={i}"],
            cwd=ROOT, env=_env(devices_per_process), stdout=log, stderr=subprocess.STDOUT, text=True))
    if on_start is not None:
        on_start(procs)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                hung = [i for i, p in enumerate(procs) if p.poll() is None]
                for p in procs:
                    p.kill()
                outputs = _read(logs)
                details = "\n".join(f"--- process {i}, last lines:\n{_tail(outputs[i])}" for i in hung)
                raise AssertionError(f"processes {hung} of {' '.join(argv)} still running after "
                                     f"{timeout:.0f} s (hung?); killed.\n{details}")
            if any(p.returncode not in (None, 0) for p in procs):
                # One process failed: the others would wait for it in a collective until the timeout.
                time.sleep(5)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
        return Finished([p.returncode for p in procs], _read(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
            os.unlink(log.name)


def _log_path(port: int, i: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"unclip-multihost-{port}-{i}.log")


def _read(logs) -> list[str]:
    out = []
    for log in logs:
        log.flush()
        log.seek(0)
        out.append(log.read())
    return out
