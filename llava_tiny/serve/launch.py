"""Start a server (`llava_tiny.serve.api` or `.web`) as a child process on a free loopback port, wait
until it answers, and always stop it: what the tests and `bench/serve_throughput.py` use.

    with ServerProcess("llava_tiny.serve.api", ["--model-path", "runs/lora"], log_path="api.log") as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="none")...
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m MODULE ARGS --host 127.0.0.1 --port P` until `stop()` (or the `with` block ends)."""

    def __init__(self, module: str, args: list[str], log_path: str, ready_path: str = "/health",
                 env: dict | None = None, timeout: float = 180):
        self.module, self.args, self.log_path, self.ready_path = module, args, log_path, ready_path
        self.env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode} before answering:\n"
                                   f"{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.module} did not answer {self.ready_path} within {self.timeout} s:\n"
                           f"{self.log()[-3000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """Terminate, then kill after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
