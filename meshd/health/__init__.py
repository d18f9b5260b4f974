"""Local health checks and the answers to `health` and custom queries (shell: asyncio).

Checks, each on its own interval with its own timeout (Consul's semantics where Consul has them):

    kind       passing / warning / critical                                  output kept
    --------   -----------------------------------------------------------   ------------------
    command    exit 0 / exit 1 / any other exit, a signal, a timeout or      stdout+stderr, the
               a command that cannot start                                   last 4 KiB
    http       GET 2xx / 429 / anything else, or no answer in time           status + body head
    tcp        connect works / - / refused, unreachable, timeout             what happened
    load       1-minute load per core below warning (2.0) and critical (4.0)
    memory     MemAvailable in percent of MemTotal above warning (10) and critical (5)
    disk       free space of `path` (percent, for unprivileged users) above warning (10), critical (5)
    loop_lag   the event loop's worst lag since the last run below warning (100ms), critical (500ms)

Built-in checks "load", "memory", "disk-data" (the data dir), "disk-root" (/) and "loop-lag" are
always there unless a [[check]] with the same name replaces them (or says `enabled = false`).
The summary is the worst status of all checks. A check starts `critical` ("not run yet"), as in
Consul; HealthMonitor.start() runs every check once before it returns.

Config ([[check]] tables): name, kind (or type; inferred from command/url/addr when absent),
command (a list: run as is; a string: run by /bin/sh -c), url, addr ("host:port"), path (disk),
interval (default 10s), timeout (default 10s), warning/critical (built-in kinds), enabled.
[[query_handler]] tables: name, command, timeout; the handler gets the query payload on stdin and
its output (the first 32 KiB) is the answer. Every error names the check and the key.

Modules: spec (statuses, kinds, CheckSpec), config (the tables), command (running a command),
checks (each kind), loop_lag, monitor (HealthMonitor), service (HealthService: the monitor wired
into the runtime: gossiped summary, query answers, events, metrics). The names others use are
re-exported here.
"""

from meshd.health.config import parse_checks, parse_query_handlers
from meshd.health.monitor import HealthMonitor
from meshd.health.spec import HEALTH_QUERY, CheckSpec, HandlerSpec, Status

__all__ = [
    "HEALTH_QUERY",
    "CheckSpec",
    "HandlerSpec",
    "HealthMonitor",
    "Status",
    "parse_checks",
    "parse_query_handlers",
]
