"""Fixtures for the e2e tier: one real ComfyUI server per session, tiny models, synthetic inputs, timings.

Skips (with the reason) when COMFYUI_DIR is unset. COMFY_PYTHON is the interpreter that runs the server
(default: the one running pytest); the tiny models are built and the registry is read with that interpreter
too (in a subprocess when it is not this one), so pytest itself needs no ComfyUI. Environment knobs: FFP_E2E_START_TIMEOUT (s, default 180), FFP_E2E_PROMPT_TIMEOUT
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
def comfy_server(comfy_root, comfy_python, tmp_path_factory):
    """The real ComfyUI server on CPU with only this pack (as ComfyUI-FFProp) and the test pack loaded."""
    from e2e_server import ComfyServer

    base = tmp_path_factory.mktemp("comfy") / "base"
    server = ComfyServer(comfy_root, base, REPO, comfy_python)
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
def comfy_python() -> str:
    """The interpreter that runs the server and builds the models (COMFY_PYTHON, default: this one)."""
    return os.environ.get("COMFY_PYTHON") or sys.executable


@pytest.fixture(scope="session")
def registered_ids(comfy_root, comfy_python) -> list[str]:
    """Node ids of ffprop.nodes.registry.NODES, as the server's interpreter imports them."""
    from e2e_models import in_python

    return in_python(comfy_python, "registry-ids")


@pytest.fixture(scope="session")
def tiny_models(comfy_server, comfy_python, tmp_path_factory) -> dict[str, str]:
    """Tiny Wan 2.1 DiTs (i2v, t2v, fun_control) and the random Wan 2.1 VAE in the server's models dir.
    Returns {"i2v"|"t2v"|"fun_control"|"vae": file name as the loaders list it}."""
    from e2e_models import VAE_NAME, WAN_KINDS, in_python, tiny_wan_name

    keep = os.environ.get("FFP_E2E_CACHE_DIR")
    cache = Path(keep) if keep else tmp_path_factory.mktemp("vae_cache")
    t0 = time.perf_counter()
    in_python(comfy_python, "write-models", str(comfy_server.models_dir), str(cache))
    TIMINGS["tiny models (write)"] = time.perf_counter() - t0
    yield {**{k: tiny_wan_name(k) for k in WAN_KINDS}, "vae": VAE_NAME}
    if not keep:
        shutil.rmtree(cache, ignore_errors=True)  # 254 MB; pytest keeps its last 3 temp dirs otherwise


@pytest.fixture(scope="session")
def sam2_models(comfy_server, comfy_python) -> dict:
    """A random-weight SAM2.1 tiny checkpoint in the server's models/sam2 (for workflows with FFPSAM2Loader)."""
    from e2e_models import in_python

    t0 = time.perf_counter()
    result = in_python(comfy_python, "write-sam2", str(comfy_server.models_dir))
    TIMINGS["tiny SAM2 (write)"] = time.perf_counter() - t0
    return result


@pytest.fixture(autouse=True)
def _sam2_for_workflows(request):
    """Tests that run workflows (they use tiny_models) also get the SAM2 checkpoint."""
    if "tiny_models" in request.fixturenames:
        request.getfixturevalue("sam2_models")


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session's browser tests (skips with the reason when it is not installed)."""
    from e2e_browser import Browser, find_browser

    exe, driver, why = find_browser()
    if exe is None:
        pytest.skip(why)
    t0 = time.perf_counter()
    b = Browser(exe, driver)
    TIMINGS["browser start"] = time.perf_counter() - t0
    try:
        yield b
    finally:
        b.close()


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    TIMINGS["pytest session (collection to summary)"] = time.perf_counter() - _T0
    terminalreporter.section("FFProp e2e timings")
    for name, sec in TIMINGS.items():
        terminalreporter.write_line(f"{sec:8.2f} s  {name}")
