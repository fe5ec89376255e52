"""A fork server for the kill tests: one process imports the model layer once, then forks a child per
job, so that each process the tests SIGKILL costs a fork instead of the seconds a fresh interpreter
spends importing torch, transformers and PEFT. A child runs ``qadapter train`` through ``cli.main``
(the command's own code) or a loop of ``save_pretrained`` calls; it is a real process, and the signal
is a real SIGKILL.

Requests and replies are JSON lines on the server's stdin and stdout. The server alone signals and
reaps its children, so the process it kills is never a reaped one whose pid was reused.

- ``{"job": "cli", "argv": [...], "log": path}`` or ``{"job": "save_loop", "out": path, "log": path}``:
  forks the child (its stdout and stderr go to ``log``) -> ``{"pid": n}``
- ``{"op": "status"}`` -> ``{"running": true}``, or the child's end (below), reaped
- ``{"op": "kill"}`` -> SIGKILL unless it has already exited, reaped -> its end:
  ``{"running": false, "killed": bool, "code": exit status or None}``
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback


def _save_loop(out: str) -> int:
    """Saves the adapter over and over, version after version; prints each version once it is saved."""
    from helpers import make_model, perturb_adapter

    model = make_model()
    for version in range(10_000):
        perturb_adapter(model, seed=version)
        model.save_pretrained(out)
        print(version, flush=True)
    return 0


def _child(request: dict) -> None:
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if request["job"] == "cli":
            from qadapter.cli import main

            code = main(request["argv"])
        else:
            code = _save_loop(request["out"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _end(status: int) -> dict:
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"running": False, "killed": killed, "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


def serve() -> None:
    # What the children run, imported once here. Only imports run before a fork: no model is loaded
    # and nothing is trained in this process, so each child starts as a fresh one would.
    import helpers  # noqa: F401
    import qadapter.cli  # noqa: F401
    from qadapter.evaluation import measures  # noqa: F401
    from qadapter.library import data, model, trainer  # noqa: F401

    pid = None
    reply = {"ready": True}
    while True:
        print(json.dumps(reply), flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        request = json.loads(line)
        if "job" in request:
            if pid is not None:  # one child at a time: one a failed test left is ended first
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply = {"pid": pid}
        elif pid is None:
            reply = {"error": "no child"}
        else:
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and request["op"] == "kill":
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
            reply = {"running": True} if not done else _end(status)
            if done:
                pid = None
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class ForkServer:
    """The test side: starts the server and runs one child at a time through it."""

    def __init__(self, env: dict):
        self.process = subprocess.Popen([sys.executable, "-m", "fork_server"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        assert self._reply() == {"ready": True}

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server stopped (exit status {self.process.wait()})")
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def start(self, log, *, argv: list[str] | None = None, save_loop_into=None) -> int:
        """Forks a child running ``qadapter`` with ``argv``, or the save loop into ``save_loop_into``."""
        job = {"job": "cli", "argv": argv} if argv is not None else {"job": "save_loop", "out": str(save_loop_into)}
        return self._ask({**job, "log": str(log)})["pid"]

    def running(self) -> bool:
        self.last = self._ask({"op": "status"})
        return self.last["running"]

    def kill(self) -> dict:
        """SIGKILLs the child unless it has already exited; how it ended (``killed``, ``code``)."""
        return self._ask({"op": "kill"})

    def wait(self, timeout: float) -> dict:
        """How the child ended; killed (and reported so) if it runs past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return {**self.kill(), "timed_out": True}
            time.sleep(0.02)
        return self.last

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


if __name__ == "__main__":
    serve()
