"""Fixtures for the e2e tier: one real ComfyUI server per session, tiny models, synthetic inputs, timings.

Skips (with the reason) when COMFYUI_DIR is unset. COMFY_PYTHON is the interpreter that runs the server
(default: the one running pytest); the models are built in the pytest process, which therefore also needs
ComfyUI importable. Environment knobs: FFP_E2E_START_TIMEOUT (s, default 180), FFP_E2E_PROMPT_TIMEOUT
(s, default 300), FFP_E2E_CACHE_DIR (keep the 254 MB random VAE between runs), FFP_E2E_KEEP (keep the temp
base dir and print where it is).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from e2e_server import TIMINGS, env_seconds

REPO = Path(__file__).resolve().parents[2]
_T0 = time.perf_counter()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    from comfy_support import comfyui_dir

    root = comfyui_dir()
    if root is None:
        pytest.skip("COMFYUI_DIR is not set; set it to a ComfyUI checkout to run the e2e tier (tests/e2e/README.md)")
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        pytest.skip(f"COMFYUI_DIR={root} is not a ComfyUI checkout (no main.py / comfy/)")
    return root


@pytest.fixture(scope="session")
def comfy_server(comfy_root, tmp_path_factory):
    """The real ComfyUI server on CPU with only this pack (as ComfyUI-FFProp) and the test pack loaded."""
    from e2e_server import ComfyServer

    base = tmp_path_factory.mktemp("comfy") / "base"
    python = os.environ.get("COMFY_PYTHON") or sys.executable
    server = ComfyServer(comfy_root, base, REPO, python)
    try:
        TIMINGS["server start"] = server.start(timeout=env_seconds("FFP_E2E_START_TIMEOUT", 180))
        yield server
    finally:
        t0 = time.perf_counter()
        server.stop()
        TIMINGS["server stop"] = time.perf_counter() - t0
        if os.environ.get("FFP_E2E_KEEP"):
            print(f"\nFFP_E2E_KEEP: base dir {base}, log {server.log_path}")
        else:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    """Print the server log tail into the report of any failed test that used the server."""
    yield
    if "comfy_server" not in request.fixturenames:
        return
    rep = getattr(request.node, "rep_call", None) or getattr(request.node, "rep_setup", None)
    if rep is not None and rep.failed:
        print(request.getfixturevalue("comfy_server").log_tail(120))


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict[str, dict]:
    t0 = time.perf_counter()
    info = comfy_server.object_info()
    TIMINGS["GET /object_info"] = time.perf_counter() - t0
    return info


@pytest.fixture(scope="session")
def tiny_models(comfy_server, tmp_path_factory) -> dict[str, str]:
    """Tiny Wan 2.1 DiTs (i2v, t2v, fun_control) and the random Wan 2.1 VAE in the server's models dir.
    Returns {"i2v"|"t2v"|"fun_control"|"vae": file name as the loaders list it}."""
    from comfy_support import import_comfy
    from e2e_models import VAE_NAME, WAN_KINDS, tiny_wan_name, write_models

    import_comfy()
    cache = Path(os.environ.get("FFP_E2E_CACHE_DIR") or tmp_path_factory.mktemp("vae_cache"))
    t0 = time.perf_counter()
    write_models(comfy_server.models_dir, cache)
    TIMINGS["tiny models (write)"] = time.perf_counter() - t0
    return {**{k: tiny_wan_name(k) for k in WAN_KINDS}, "vae": VAE_NAME}


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    TIMINGS["e2e tier (session so far)"] = time.perf_counter() - _T0
    terminalreporter.section("FFProp e2e timings")
    for name, sec in TIMINGS.items():
        terminalreporter.write_line(f"{sec:8.2f} s  {name}")
