"""Start and drive a real ComfyUI server for the e2e tier (stdlib only: subprocess + urllib).

Layout of one session (nothing is written into COMFYUI_DIR):

    <base>/                      --base-directory (ComfyUI >= 0.3.2x: models, custom_nodes, input, output,
      custom_nodes/                temp and user all hang off it)
        ComfyUI-FFProp -> repo   the pack under test, under a folder name that is not "ffprop"
        ffprop_e2e_nodes -> tests/e2e/ffprop_e2e_nodes   the test-only node pack
      models/diffusion_models/, models/vae/   tiny test models
      input/ output/ temp/ user/
    server.log                   stdout + stderr of the server

Command: `main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <base> --disable-all-custom-nodes
--whitelist-custom-nodes ComfyUI-FFProp ffprop_e2e_nodes --database-url sqlite:///:memory: ...`.
Startup, every prompt and shutdown are bounded; `stop()` always ends the process group it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMINGS: dict[str, float] = {}  # name -> seconds, printed by conftest.pytest_terminal_summary


def env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


PACK_FOLDER = "ComfyUI-FFProp"  # deliberately not "ffprop": the pack must load under any folder name
TEST_PACK_FOLDER = "ffprop_e2e_nodes"
TEST_PACK_DIR = Path(__file__).resolve().parent / TEST_PACK_FOLDER


class ServerError(RuntimeError):
    """The server failed to start, rejected a prompt, or a prompt failed or timed out."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PromptResult:
    prompt_id: str
    seconds: float
    history: dict
    files: list[Path] = field(default_factory=list)


class ComfyServer:
    def __init__(self, comfyui_dir: Path, base_dir: Path, repo_dir: Path, python: str,
                 extra_args: tuple[str, ...] = ()):
        self.comfyui_dir = Path(comfyui_dir)
        self.base = Path(base_dir)
        self.repo = Path(repo_dir)
        self.python = python
        self.extra_args = tuple(extra_args)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base.parent / f"{self.base.name}_server.log"
        self.start_seconds = float("nan")
        self.client_id = uuid.uuid4().hex

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base / "temp"

    def prepare(self) -> None:
        """Create the base directory with the two custom node packs linked in (no copies)."""
        for sub in ("custom_nodes", "models/diffusion_models", "models/vae", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_FOLDER, self.repo), (TEST_PACK_FOLDER, TEST_PACK_DIR)):
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)

    # ---- process ------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER, TEST_PACK_FOLDER,
            "--database-url", "sqlite:///:memory:",  # the default lives in <COMFYUI_DIR>/user/
            "--disable-auto-launch", "--disable-api-nodes", "--disable-metadata",
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0) -> float:
        self.prepare()
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} during startup.\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                self.start_seconds = time.perf_counter() - t0
                return self.start_seconds
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)
        self.stop()
        raise ServerError(f"ComfyUI did not answer on port {self.port} within {timeout:.0f} s.\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the session we started (start_new_session=True)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"---- last {len(tail)} lines of {self.log_path} ----\n" + "\n".join(tail)

    # ---- HTTP ---------------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=timeout) as r:  # noqa: S310 (local server)
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 60) -> tuple[int, Any]:
        req = urllib.request.Request(self.url(path), data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (local server)
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def object_info(self) -> dict[str, dict]:
        return self.get("/object_info", timeout=120)

    # ---- prompts ------------------------------------------------------------------------------------------
    def run_prompt(self, api: dict, timeout: float = 300.0, label: str = "prompt") -> PromptResult:
        """POST /prompt, poll /history until done; raise ServerError with the server's own message on failure."""
        t0 = time.perf_counter()
        status, body = self.post("/prompt", {"prompt": api, "client_id": self.client_id})
        if status != 200:
            raise ServerError(f"{label}: POST /prompt answered {status}:\n{format_prompt_error(body)}")
        pid = body["prompt_id"]
        if body.get("node_errors"):  # 200 with node_errors: ComfyUI runs only the outputs that validated
            self.post("/queue", {"delete": [pid]})
            self.post("/interrupt", {})
            raise ServerError(f"{label}: some outputs failed validation (the server would run only the rest):\n"
                              f"{format_prompt_error(body)}")
        deadline = t0 + timeout
        while True:
            hist = self.get(f"/history/{pid}").get(pid)
            if hist:  # an entry appears in /history only once the prompt has finished
                if (hist.get("status") or {}).get("status_str") == "success":
                    break
                raise ServerError(f"{label}: execution failed:\n{format_history_error(hist)}")
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"{label}: the server died while running the prompt.\n{self.log_tail()}")
            if time.perf_counter() > deadline:
                self.post("/interrupt", {})
                self.post("/queue", {"delete": [pid]})
                raise ServerError(f"{label}: not done after {timeout:.0f} s (interrupted).\n{self.log_tail(30)}")
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        return PromptResult(pid, seconds, hist, self.output_files(hist))

    def output_files(self, hist: dict) -> list[Path]:
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for node_out in (hist.get("outputs") or {}).values():
            for value in node_out.values():
                for item in value if isinstance(value, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        files.append(root / item.get("subfolder", "") / item["filename"])
        return files


def format_prompt_error(body: Any) -> str:
    if not isinstance(body, dict):
        return str(body)
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('type')}: {err.get('message')} {err.get('details') or ''}".rstrip())
    for nid, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or json.dumps(body)[:2000]


def format_history_error(hist: dict) -> str:
    for event, data in hist.get("status", {}).get("messages", []):
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{tb}")
    return json.dumps(hist.get("status"), indent=1)[:3000]
