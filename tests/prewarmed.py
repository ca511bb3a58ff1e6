"""Run the tests' ``harmsweep`` commands in forks of one pre-warmed process instead of fresh interpreters.

A fresh ``python -m harmsweep.cli`` spends 3-10 s of a 2-core machine importing torch, transformers and the
pipeline before it reads its first override, and the suite runs it a few hundred times. A server process
imports all of that once and forks one child per command. It never runs a torch op or starts a thread, so its
children start as clean as a fresh interpreter. A child is a process of its own to the command: its own argv,
environment, working folder, stdout/stderr, exit status (negative for a signal, as subprocess reports it).

A command whose environment differs in what those imports read (HF_*, TRANSFORMERS_*, TORCH*, ...) runs as a
real subprocess instead, so nothing a test sets is silently ignored. ``HARMSWEEP_PREWARMED=0`` turns the server
off (every command a real subprocess). ``start()`` gives a running command (to poll, signal or kill), ``run()`` a
finished one.

    python tests/prewarmed.py SOCKET   # the server; tests use run()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

# imported once by the server: what every harmsweep command would import on its own
PRELOAD = (
    "torch",
    "transformers",
    "hydra",
    "omegaconf",
    "harmsweep.cli",
    "harmsweep.pipeline.run",
    "harmsweep.experiments",
    "harmsweep.report.cli",
    "harmsweep.sweep.plan",
    "hydra_plugins.harmsweep_launcher.harmsweep_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)
# environment read while those modules import: a command that changes any of it needs a fresh interpreter
# (not TOKENIZERS_PARALLELISM: read when a tokenizer runs, and set by transformers' own generate in the test process)
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "CUDA", "PYTHON")
COUNTS = {"forked": 0, "fresh": 0}  # commands run each way (the suite's summary line prints them)
FRESH_BECAUSE: set[str] = set()  # the variables that sent commands to a fresh interpreter


def _import_time_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


# ---------------------------------------------------------------- the server


def _child(request: dict, listener: socket.socket) -> None:
    """In the forked child: become the command, run it, exit with its status (never returns)."""
    code = 1
    try:
        listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        import runpy

        sys.argv = [request["module"], *request["args"]]
        sys.modules.pop(request["module"], None)  # executed afresh as __main__, as `python -m` does
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (W&B, logging), then no server cleanup
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(path: str) -> None:
    """Accept one JSON request per connection; answer the child's pid, then its exit status."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # a session started in the background (`make test &`) inherits SIGINT ignored; a command run from a terminal
    # has Python's Ctrl-C handler, and the interrupt tests send it SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "wandb" in sys.modules:  # its settings are read from WANDB_* at import: keep it per command
        raise RuntimeError("the pre-warmed server must not import wandb")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection awaiting its status
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    print("ready", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:  # the test session is gone (even killed): so is the server
        for _key, _ in selector.select(timeout=0.05):
            conn, _ = listener.accept()
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if not data:
                conn.close()
                continue
            request = json.loads(data)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request, listener)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):  # the client gave up (timeout) and closed
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()


# ---------------------------------------------------------------- the client


class _Server:
    """The running server: started on first use, stopped when the test session's interpreter exits."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="harmsweep-prewarmed-")
        self.socket = os.path.join(self.folder, "s")
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, __file__, self.socket], stdout=subprocess.PIPE, text=True,
                                     env=self.env, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"the pre-warmed harmsweep server did not start (exit {self.proc.poll()})")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


_server: _Server | None = None
_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        return _server


class Forked:
    """A command running in a fork of the server, with what tests use of subprocess.Popen: pid, poll, wait, kill."""

    def __init__(self, argv: list[str], server: _Server, request: dict) -> None:
        self.args, self.returncode, self._buffer = argv, None, b""
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server.socket)
        self._conn.sendall(json.dumps(request).encode() + b"\n")
        self.pid = int(self._line(None) or 0)

    def _line(self, timeout: float | None) -> str | None:
        """The server's next line; None when none came within ``timeout`` seconds (0: do not wait)."""
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self._conn.recv(64)
            except (TimeoutError, BlockingIOError):
                return None
            if not chunk:
                raise RuntimeError(f"the pre-warmed server lost command {self.args}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _finished(self, line: str | None) -> int | None:
        if line is not None:
            self.returncode = int(line)
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode if self.returncode is not None else self._finished(self._line(0))

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._finished(self._line(timeout)) is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return int(self.returncode)  # type: ignore[arg-type]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(
    module: str,
    args: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    stdout: str = os.devnull,
    stderr: str = os.devnull,
) -> Forked | subprocess.Popen:
    """``python -m module *args`` started, its output written to the files ``stdout`` and ``stderr``: a fork of the
    server, or a real subprocess where the environment differs in what the server imported (or the server is off)."""
    env = dict(os.environ if env is None else env)
    argv = [sys.executable, "-m", module, *map(str, args)]
    server = _get_server() if os.environ.get("HARMSWEEP_PREWARMED", "1") != "0" else None
    mine, theirs = _import_time_env(env), _import_time_env(server.env if server else env)
    if server is None or mine != theirs:
        COUNTS["fresh"] += 1
        if server is None:
            FRESH_BECAUSE.add("HARMSWEEP_PREWARMED=0")
        FRESH_BECAUSE.update(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        with open(stdout, "w") as out, open(stderr, "w") as err:
            return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    COUNTS["forked"] += 1
    request = {"module": module, "args": list(map(str, args)), "cwd": str(cwd), "env": env,
               "stdout": stdout, "stderr": stderr}  # fmt: skip
    return Forked(argv, server, request)


def run(
    module: str,
    args: Sequence[str],
    *,
    cwd: Path | str,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``python -m module *args`` with text stdout/stderr captured, as subprocess.run would give it."""
    with tempfile.TemporaryDirectory(prefix="harmsweep-cmd-") as folder:
        out, err = os.path.join(folder, "out"), os.path.join(folder, "err")
        proc = start(module, args, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        stdout = Path(out).read_text(errors="replace") if os.path.exists(out) else ""
        stderr = Path(err).read_text(errors="replace") if os.path.exists(err) else ""
    return subprocess.CompletedProcess(proc.args, code, stdout, stderr)


if __name__ == "__main__":
    serve(sys.argv[1])
