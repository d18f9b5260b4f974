"""Running a check or query-handler command: a timeout, bounded output, its process group killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from meshd.health.spec import CHECK_OUTPUT_LIMIT


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None  # None: it did not finish in time (it was killed) or did not start
    output: bytes  # stdout and stderr together, bounded
    truncated: bool
    error: str = ""  # why there is no (zero) exit code: cannot start, timeout, signal
    timed_out: bool = False


async def run_command(
    command: tuple[str, ...] | str,
    timeout: float,
    *,
    stdin: bytes = b"",
    limit: int = CHECK_OUTPUT_LIMIT,
    keep: Literal["head", "tail"] = "tail",
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run a command with a timeout, keeping at most `limit` bytes of its output.

    It runs in its own session; on timeout the whole process group is killed, so a shell
    script's children do not outlive it.
    """
    full_env = {**os.environ, **env} if env else None
    try:
        if isinstance(command, str):
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=full_env,
            )  # fmt: skip
        else:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=full_env,
            )  # fmt: skip
    except OSError as e:
        return CommandResult(None, b"", False, f"cannot run {_show(command)}: {e.strerror or e}")

    buf = bytearray()
    seen = 0

    async def communicate() -> int:
        nonlocal seen
        assert proc.stdin is not None
        assert proc.stdout is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if stdin:
                proc.stdin.write(stdin)
                await proc.stdin.drain()
            proc.stdin.close()
        while chunk := await proc.stdout.read(65536):
            seen += len(chunk)
            if keep == "tail":
                buf.extend(chunk)
                del buf[:-limit]
            elif len(buf) < limit:
                buf.extend(chunk[: limit - len(buf)])
        return await proc.wait()

    try:
        code = await asyncio.wait_for(communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return CommandResult(None, bytes(buf), seen > limit, f"timed out after {timeout:g}s", True)
    except BaseException:
        _kill_group(proc.pid)  # cancelled (daemon stopping): leave nothing behind
        raise
    if code < 0:
        return CommandResult(code, bytes(buf), seen > limit, f"killed by signal {-code}")
    return CommandResult(code, bytes(buf), seen > limit)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _show(command: tuple[str, ...] | str) -> str:
    return command if isinstance(command, str) else " ".join(command)


def output_text(data: bytes, truncated: bool) -> str:
    text = data.decode("utf-8", errors="replace")
    return f"[output truncated to the last {len(data)} bytes]\n{text}" if truncated else text
