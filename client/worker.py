"""The ClientApp executor of a site's SuperNode (started with `--isolation process`).

A SuperNode left to itself runs every message in Flower's `flwr-clientapp`, which imports the ClientApp
from the run's FAB, the coordinator's code (see client.executor). This worker is what a site runs instead:
it asks the SuperNode for tasks and serves each with the ClientApp the site installed (client.app),
through client.executor. The FAB is never unpacked or imported.

It also saves time: ours imports torch, Opacus, NeuroKit2 and the sentence encoder's library first, about
5 s per message. The worker imports the ClientApp once and forks a child per task with the modules loaded;
`--fresh` starts a new Python process per task instead (what flwr-clientapp costs, for the benchmark).

    flower-supernode ... --isolation process --port 9094   # its runtime API, where this worker asks
    python -m client.worker --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid <supernode pid>

When the SuperNode (--parent-pid) ends, the worker stops its children and exits
(ecgtwin.supervise.watchdog); a child also dies with the worker itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from ecgtwin.supervise.watchdog import watch_parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's runtime API")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the runtime API (loopback)")
    parser.add_argument("--root-certificates", help="CA certificate of the runtime API (PEM), when not insecure")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between task requests")
    parser.add_argument("--fresh", action="store_true", help="a new Python process per task instead of a fork")
    parser.add_argument("--one-task", metavar="TOKEN", help=argparse.SUPPRESS)  # what --fresh starts per task
    args = parser.parse_args(argv)
    if not args.insecure and not args.root_certificates:
        parser.error("give --insecure (loopback) or --root-certificates")
    try:
        certificates = open(args.root_certificates, "rb").read() if args.root_certificates else None
    except OSError as exc:
        parser.error(f"{args.root_certificates}: cannot read the CA certificate ({exc.strerror})")

    import client.app  # torch and the rest imported once, here; and the ClientApp every task runs

    if args.one_task:
        sys.exit(_serve(args.one_task, args, certificates, args.parent_pid))

    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if args.parent_pid is not None:  # Flower's own monitor only raises SIGINT, which its retry loop survives
        watch_parent(args.parent_pid, grace=3.0)  # stops the children, then this worker, once the SuperNode is gone
    runtime = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    print(f"client.worker: ready (pid {os.getpid()}), serving {args.runtime_api_address}", flush=True)
    try:
        while True:
            _reap()
            task = runtime.AcquireTask(request)
            if task.HasField("task") and task.token:
                _fresh(task.token, args) if args.fresh else _fork(task.token, args, certificates)
            else:
                time.sleep(args.poll)
    except KeyboardInterrupt:
        pass
    finally:
        runtime.close()


def _serve(token: str, args: argparse.Namespace, certificates: bytes | None, parent_pid: int | None) -> int:
    from client.app import app
    from client.executor import run_task

    return run_task(args.runtime_api_address, token, args.insecure, certificates, app, parent_pid=parent_pid)


def _fork(token: str, args: argparse.Namespace, certificates: bytes | None) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: one task with the site's ClientApp, then exit without returning to the loop
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = _serve(token, args, certificates, os.getppid())
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fresh(token: str, args: argparse.Namespace) -> None:
    """A new interpreter for this task (it imports everything again), as flwr-clientapp would be."""
    command = [sys.executable, "-m", "client.worker", "--runtime-api-address", args.runtime_api_address,
               "--one-task", token, "--parent-pid", str(os.getpid())]
    command += ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
    subprocess.Popen(command)


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this child when the worker ends, however it ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reap() -> None:
    """Collect finished children, so none is left a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    main()
