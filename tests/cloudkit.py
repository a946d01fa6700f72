"""Running `edgehub cloud` in tests: the CLI as a subprocess with a deadline,
against any broker with a ``url`` (a Mosquitto ``Upstream``, a NATS node),
and what its commands print, parsed.

A test module that uses it imports the autouse fixture that tells it which
binary to run: ``from cloudkit import _cloud_binary``.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading

import pytest

from authkit import HUB_NAME, username_for
from helpers import hub_env, wait_value

CLI_TIMEOUT = 60.0

_BIN: list[str] = []


@pytest.fixture(autouse=True)
def _cloud_binary(edgehub_bin):  # noqa: PT004
    """The binary `cloud(...)` runs: the one the hub fixtures use."""
    _BIN[:] = [edgehub_bin]


def cloud_cmd(upstream, *args: str) -> list[str]:
    return [_BIN[0], "cloud", "--broker", upstream.url, *args]


def describe(r: subprocess.CompletedProcess) -> str:
    return f"`{' '.join(r.args)}` exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def cloud(upstream, *args: str, rc: int | None = 0, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs `edgehub cloud --broker <upstream> ARGS...` (text output); asserts
    its exit status is ``rc`` unless ``rc`` is None."""
    r = subprocess.run(cloud_cmd(upstream, *args), capture_output=True, text=True, timeout=timeout,
                       env=hub_env(), stdin=subprocess.DEVNULL)
    if rc is not None:
        assert r.returncode == rc, f"expected exit {rc}: {describe(r)}"
    return r


def published_version(r: subprocess.CompletedProcess, edge: str) -> int:
    """The scope version the CLI says it published for ``edge``."""
    m = re.findall(rf"^{re.escape(edge)}: scope version (\d+) published$", r.stderr, re.MULTILINE)
    assert len(m) == 1, f"expected one `{edge}: scope version N published` line: {describe(r)}"
    return int(m[0])


def scope_list(upstream, *args: str) -> list[dict]:
    r = cloud(upstream, "scope", "list", *args)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def connection_string(upstream, identity: str, *args: str) -> dict[str, str]:
    r = cloud(upstream, "connection-string", identity, "--hub", HUB_NAME, *args)
    line = r.stdout.strip()
    assert "\n" not in line, describe(r)
    return dict(part.split("=", 1) for part in line.split(";"))


def token(upstream, identity: str, *args: str) -> str:
    return cloud(upstream, "token", identity, "--hub", HUB_NAME, *args).stdout.strip()


def creds(identity: str, password: str) -> dict:
    """Client id, username and password of ``d`` or ``edge/module``."""
    device, _, module = identity.partition("/")
    return {"client_id": identity, "username": username_for(device, module or None), "password": password}


def twin_get(upstream, identity: str) -> dict:
    r = cloud(upstream, "twin", "get", identity)
    doc = json.loads(r.stdout)
    assert set(doc) == {"desired", "reported"}, describe(r)
    return doc


def wait_twin(upstream, identity: str, pred, timeout: float, desc: str) -> dict:
    return wait_value(lambda: twin_get(upstream, identity), pred, timeout, desc,
                      shown=f"last `twin get {identity}`")


class Tail:
    """`edgehub cloud tail ...` running in the background; ``listening`` is
    set once it says so on stderr."""

    def __init__(self, upstream, *args: str):
        self.proc = subprocess.Popen(cloud_cmd(upstream, "tail", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=hub_env(), stdin=subprocess.DEVNULL)
        self.listening = threading.Event()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            if line.strip() == "listening":
                self.listening.set()

    def wait_listening(self, timeout: float = 15.0) -> None:
        if not self.listening.wait(timeout):
            self.proc.kill()
            raise AssertionError(f"tail never said `listening`; stderr: {''.join(self.stderr)!r}")

    def finish(self, timeout: float = 30.0) -> tuple[int, list[dict]]:
        """Exit status and the JSON lines printed, once it exits by itself."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
            raise AssertionError(f"tail did not exit within {timeout}s; printed {out!r}") from None
        self._reader.join(5)
        return self.proc.returncode, [json.loads(line) for line in out.splitlines() if line.strip()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
