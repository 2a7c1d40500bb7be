"""Run one task of the SuperNode with the ClientApp this site installed, never the coordinator's FAB.

Flower's own per-task runner (`flwr-clientapp`, `run_clientapp`) unpacks the run's FAB (the app bundle the
coordinator submitted with `flwr run`), puts its folder first on `sys.path` and imports the ClientApp its
pyproject names from there: the coordinator's code, and any module it ships, would run at the hospital with
the patients' data. This runner takes the task from the SuperNode's runtime API with Flower's own calls
(message, context, run, FAB), logs the FAB's hash, and hands the message to `client.app.app`, the
ClientApp installed with this site's reviewed copy of ecgtwin. The FAB is never unpacked, installed or
imported. A failure the ClientApp did not already turn into a refusal is answered with a fixed error code
and reason; the text stays in this process's log (the SuperNode's, at the site).
"""

from __future__ import annotations

import sys
from typing import Callable

from flwr.app import Context, Message


def run_task(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None,
             app: Callable[[Message, Context], Message], parent_pid: int | None = None) -> int:
    """Serve the task `token` with `app`; the exit code (0: the reply was pushed)."""
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, code = None, SubStatus.FAILED, 1
    try:
        message, context, run, fab = pull_task_input(client)  # the FAB's bytes come along; they are not used
        print(f"client.executor: run {run.run_id} ({run.fab_id} {run.fab_version}, FAB {fab.hash_str[:12]}): "
              "served by this site's installed client.app, the FAB is not run", file=sys.stderr, flush=True)
        try:
            reply = app(message, context)
        except Exception as exc:  # noqa: BLE001  client.app answers its own failures; this is a last resort
            print(f"client.executor: the ClientApp raised {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="site error: internal error"),
                            reply_to=message)
        push_message(client, reply, context)
        status, code = SubStatus.COMPLETED, 0
    finally:
        push_task_output(client=client, context=context, sub_status=status,
                         details="" if code == 0 else "the site's ClientApp task failed")
        heartbeat.stop()
        client.close()
    return code
