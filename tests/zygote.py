"""A warm start for the Python processes the tests start: one server per test session imports torch,
megatron-core and transformers once (about 6 s of every cold start on 2 cores), then forks a child for
each process. The child is what a fresh `python ARGV` would be from there on: it gets the process's argv,
working directory, environment, stdin/stdout/stderr and warning filters, runs the module (`-m`), script
or `-c` code the way the interpreter does, and exits with its status. megaflow itself is not pre-imported:
every run imports its code and reads its environment afresh.

Inside a child, `sys.executable` is a shim (`SOCKET_DIR/python`) that asks the same server for the
process it was started for, forwards signals to it, and exits with its status; when the shim dies the
server kills its process (as PR_SET_PDEATHSIG would). So what megaflow starts itself, the pipeline's
stages, torchrun and its ranks, starts warm too. The shim runs a cold interpreter instead whenever the
warm one could differ: another option than -u, -m or -c, a changed start-up variable, inherited extra
file descriptors (multiprocessing's spawn).

The server refuses to start when the imports leave a Python thread running (a fork would copy its
locks, not the thread); conftest then starts cold processes. MEGAFLOW_TEST_ZYGOTE=0 does the same. Tests
that kill a process or read its command line start it with subprocess themselves, cold.

    python -m tests.zygote SOCKET      # what conftest starts; prints "ready" or "refused: WHY"
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import warnings

PRELOAD = (
    "torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.optimizer", "megatron.core.distributed", "megatron.core.dist_checkpointing",
    "megatron.core.pipeline_parallel", "megatron.core.inference.contexts", "megatron.core.datasets.gpt_dataset",
    "megatron.core.datasets.blended_megatron_dataset_builder", "torch.distributed.run", "transformers",
    "tokenizers", "safetensors",
)
# Read as an interpreter or a library starts: a process whose environment changes one starts cold.
# (OMP_NUM_THREADS, which torchrun sets for its ranks, becomes torch.set_num_threads in the child.)
START_VARIABLES = ("PYTHONWARNINGS", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONSAFEPATH", "PYTHONDEVMODE",
                   "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LD_PRELOAD", "LD_LIBRARY_PATH")
HEADER = struct.Struct("<Q")
STARTUP_FILTERS = list(warnings.filters)  # the interpreter's own, with the server's PYTHONWARNINGS
_OWN = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
SITE_PATH = [p for p in sys.path[1:] if os.path.abspath(p) not in _OWN]  # sys.path less [0] and PYTHONPATH
REAL_PYTHON = sys.executable


def can_stand_in(env: dict, server_env: dict) -> bool:
    return all(env.get(k) == server_env.get(k) for k in START_VARIABLES)


# ---- the server ---------------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Preload, then fork a child per request; send each client its child's pid, then its wait status."""
    import importlib

    _die_with_parent()
    sys.modules.setdefault("wandb", None)  # as megaflow's CLI does; the child may still import it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    if threading.active_count() != 1:
        print(f"refused: {threading.active_count()} Python threads after the imports", flush=True)
        return
    server_env = dict(os.environ)
    shim = _write_shim(os.path.join(os.path.dirname(path), "python"), path, server_env)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    live: dict[int, socket.socket] = {}  # child pid -> its client's connection
    print("ready", flush=True)
    while True:
        for key, _ in selector.select(timeout=0.02):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    for s in (listener, conn, *live.values()):
                        s.close()
                    selector.close()
                    _become(request, fds, shim, server_env)  # ends the process
                for fd in fds:
                    os.close(fd)
                try:
                    conn.sendall(HEADER.pack(pid))
                except OSError:
                    pass
                live[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
            else:  # a client sends nothing after its request: readable means it went away
                pid = key.data
                if pid in live:
                    _kill(pid)
        while live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = live.pop(pid, None)
            if conn is not None:
                selector.unregister(conn)
                try:
                    conn.sendall(HEADER.pack(status))
                except OSError:
                    pass
                conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _write_shim(shim: str, socket_path: str, server_env: dict) -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = {k: server_env.get(k) for k in START_VARIABLES}
    with open(shim, "w") as f:
        f.write(f"#!{REAL_PYTHON} -S\nimport sys\nsys.path.insert(0, {repo!r})\n"
                f"from tests.zygote import shim_main\nshim_main({socket_path!r}, {start!r})\n")
    os.chmod(shim, 0o755)
    return shim


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    if len(head) != HEADER.size or len(fds) != 3:
        raise ValueError("a malformed request")
    (size,) = HEADER.unpack(head)
    return json.loads(_read(conn, size)), fds


def _become(request: dict, fds: list[int], shim: str, server_env: dict) -> None:
    """Turn this fork into `python [-u] ARGV` (`-m MODULE ...`, `-c CODE ...` or `SCRIPT ...`) started in
    CWD with ENV."""
    import io

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if sys.modules.get("wandb", 0) is None:  # a run that logs to W&B imports it; the others block it again
        del sys.modules["wandb"]
    warnings.filters[:] = STARTUP_FILTERS
    if os.environ.get("OMP_NUM_THREADS") != server_env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    argv = request["argv"]
    if request.get("unbuffered") or os.environ.get("PYTHONUNBUFFERED"):
        for name, fd in (("stdout", 1), ("stderr", 2)):
            old = getattr(sys, name)
            setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=old.encoding,
                                                errors=old.errors, write_through=True))
    sys.executable = shim
    # first what -m puts there (the working directory), '' for -c, or a script's own folder; then
    # PYTHONPATH, then site-packages
    if argv[0] == "-m":
        first = request["cwd"]
    elif argv[0] == "-c":
        first = ""
    else:
        first = os.path.dirname(os.path.abspath(argv[0]))
    sys.path[:] = [first, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), *SITE_PATH]
    try:
        _run(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        code = -signal.SIGINT
        sys.excepthook(*sys.exc_info())
    except BaseException:
        code = 1
        sys.excepthook(*sys.exc_info())
    _end(code)


def _run(argv: list[str]) -> None:
    import runpy

    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy._run_module_as_main(argv[1], alter_argv=True)
    elif argv[0] == "-c":
        import types

        sys.argv = ["-c", *argv[2:]]
        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def _end(code) -> None:
    """End as the interpreter does (join the threads, run the atexit functions, flush) but without its
    teardown of every module: 1.5 s of each torch+megatron process (cold ones pay it)."""
    import atexit

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # an uncaught KeyboardInterrupt ends by SIGINT
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


# ---- the clients: the pytest process, and the shim ------------------------------------------------------


def _request(path: str, argv: list[str], cwd: str, env: dict, fds: list[int], unbuffered: bool = False
             ) -> tuple[socket.socket, int]:
    """Ask the server for `python ARGV`; returns the open connection (its status comes on it) and the pid."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        raise
    data = json.dumps({"argv": argv, "cwd": cwd, "env": env, "unbuffered": unbuffered}).encode()
    socket.send_fds(conn, [HEADER.pack(len(data))], fds)
    conn.sendall(data)
    (pid,) = HEADER.unpack(_read(conn, HEADER.size))
    return conn, pid


class Zygote:
    """The session's server; `run` is subprocess.run(capture_output=True, text=True) of `python ARGV`."""

    def __init__(self, path: str, env: dict):
        self.path, self.env = path, env
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(os.path.dirname(path), "server.log"), "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", path], cwd=repo, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        self.answer = self.proc.stdout.readline().strip()

    @property
    def ready(self) -> bool:
        return self.answer == "ready" and self.proc.poll() is None

    def close(self) -> None:
        import shutil

        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    def run(self, argv: list[str], cwd, env: dict, timeout: float, input: str | None = None
            ) -> subprocess.CompletedProcess:
        """Raises ConnectionRefusedError or FileNotFoundError, before anything ran, when the server is gone."""
        import tempfile

        cmd = [sys.executable, *argv]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as stdin:
            stdin.write((input or "").encode())
            stdin.seek(0)
            conn, pid = _request(self.path, list(argv), os.fspath(cwd), env,
                                 [stdin.fileno(), out.fileno(), err.fileno()])
            with conn:
                conn.settimeout(timeout)
                try:
                    (status,) = HEADER.unpack(_read(conn, HEADER.size))
                except TimeoutError:
                    _kill(pid)
                    conn.settimeout(None)
                    _read(conn, HEADER.size)
                    raise subprocess.TimeoutExpired(cmd, timeout, _text(out), _text(err)) from None
            return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), _text(out), _text(err))


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def shim_main(path: str, server_env: dict) -> None:
    """`python ARGV` in a warm child: the server's, or a cold interpreter where a warm one could differ."""
    argv = sys.argv[1:]
    unbuffered = bool(argv) and argv[0] == "-u"
    argv = argv[1:] if unbuffered else argv
    inherited = any(_fd_is_open(fd) for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2)  # listdir's own: closed
    if not _runnable(argv) or inherited or not can_stand_in(dict(os.environ), server_env):
        os.execv(REAL_PYTHON, [REAL_PYTHON, *sys.argv[1:]])
    try:
        conn, pid = _request(path, argv, os.getcwd(), dict(os.environ), [0, 1, 2], unbuffered)
    except OSError:  # the server is gone (its session ended): a cold interpreter does the same work
        os.execv(REAL_PYTHON, [REAL_PYTHON, *sys.argv[1:]])
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: _send(pid, signum))
    (status,) = HEADER.unpack(_read(conn, HEADER.size))  # recv resumes after a forwarded signal (PEP 475)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # end the way the process did, by its signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _runnable(argv: list[str]) -> bool:
    """`-m MODULE ...`, `-c CODE ...` or `SCRIPT ...`: the forms a child runs."""
    if not argv:
        return False
    return len(argv) >= 2 if argv[0] in ("-m", "-c") else not argv[0].startswith("-")


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the test zygote went away")
        data += chunk
    return data


def _text(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")  # as text=True


if __name__ == "__main__":
    serve(sys.argv[1])
