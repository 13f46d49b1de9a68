"""Drive the real ComfyUI frontend in headless Chromium for the e2e tier (selenium + the distribution's chromedriver).

Why selenium and not raw DevTools: selenium's W3C actions send real trusted pointer/keyboard events through
chromedriver (the same input pipeline as a user: pointerdown/up, buttons, shift, right click, drags), and the
package is pure Python from PyPI; the driver comes from the Debian `chromium-driver` package, so nothing is
downloaded at run time (Selenium Manager is bypassed by giving both binaries explicitly).

Setup: `apt-get install -y chromium chromium-driver` and `pip install -e '.[browser-test]'` (selenium).
Overrides: FFP_CHROMIUM (browser binary), FFP_CHROMEDRIVER (driver binary).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from typing import Any

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> tuple[str | None, str | None, str]:
    """(browser, driver, reason): paths of Chromium and chromedriver, or None with why not."""
    browser = os.environ.get("FFP_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_CANDIDATES)), None)
    driver = os.environ.get("FFP_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser:
        return None, None, "Chromium not found (apt-get install -y chromium chromium-driver, or set FFP_CHROMIUM)"
    if not driver:
        return None, None, "chromedriver not found (apt-get install -y chromium-driver, or set FFP_CHROMEDRIVER)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, None, "the selenium package is not installed (pip install -e '.[browser-test]')"
    return browser, driver, ""


def post_settings(base_url: str, settings: dict[str, Any]) -> None:
    """Store frontend settings for the default user before the page loads (e.g. skip the template dialog)."""
    req = urllib.request.Request(f"{base_url}/api/settings", data=json.dumps(settings).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (local test server)
        r.read()


class Browser:
    """One headless Chromium page on the ComfyUI frontend."""

    def __init__(self, browser: str, driver: str, width: int = 1400, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", "--force-device-scale-factor=1", "--hide-scrollbars"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(driver), options=opts)
        self.driver.set_script_timeout(60)

    def close(self) -> None:
        self.driver.quit()

    # ---- page ---------------------------------------------------------------------------------------------------
    def open_comfy(self, base_url: str, timeout: float = 90) -> float:
        """Load the frontend and wait until app.graph and the extensions are ready. Returns seconds."""
        t0 = time.perf_counter()
        self.driver.get(base_url + "/")
        self.wait_for("return !!(window.app && window.app.graph && window.app.canvas && window.comfyAPI)", timeout)
        return time.perf_counter() - t0

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def js_async(self, body: str, *args: Any) -> Any:
        """Run `body` as an async function (awaits allowed; `args` is arguments); returns its value."""
        wrapper = ("const done = arguments[arguments.length - 1]; const args = Array.from(arguments).slice(0, -1);"
                   f"(async () => {{ {body} }})().then((v) => done({{ok: v}}), (e) => done({{err: String(e && e.stack || e)}}));")
        out = self.driver.execute_async_script(wrapper, *args)
        if "err" in out:
            raise RuntimeError(f"browser script failed: {out['err']}")
        return out.get("ok")

    def wait_for(self, script: str, timeout: float = 30, *args: Any) -> Any:
        """Poll a JS expression (a `return ...` body) until truthy; raise TimeoutError with the last value."""
        deadline = time.perf_counter() + timeout
        value = None
        while time.perf_counter() < deadline:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"not true after {timeout:.0f} s: {script} (last value {value!r})")

    def settle(self, frames: int = 3) -> None:
        """Redraw the LiteGraph canvas and wait a few animation frames (DOM widgets follow the canvas)."""
        self.js_async("app.canvas.setDirty(true, true); app.canvas.draw(true, true);"
                      f"for (let i = 0; i < {frames}; i++) await new Promise((r) => requestAnimationFrame(r));")

    def console(self) -> list[str]:
        return [f"{e['level']} {e['message']}" for e in self.driver.get_log("browser")]

    def screenshot(self, path: str) -> str:
        self.driver.save_screenshot(str(path))
        return str(path)

    def screenshot_rgb(self):
        """The viewport as a numpy uint8 array [H, W, 3] (CSS px == device px: scale factor 1)."""
        import io

        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB"))

    # ---- input (real trusted events through chromedriver) -------------------------------------------------------
    def _actions(self):
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.action_builder import ActionBuilder
        from selenium.webdriver.common.actions.mouse_button import MouseButton

        return ActionChains(self.driver), ActionBuilder(self.driver), MouseButton

    def click_at(self, x: int, y: int, button: str = "left", shift: bool = False, ctrl: bool = False) -> None:
        """Click at viewport (client) coordinates with the left or right button, optionally holding shift/ctrl.

        W3C actions run tick by tick across input sources: every tick gets one key action and one pointer action
        (pauses fill the gaps), so the modifier is down for the whole click."""
        from selenium.webdriver.common.keys import Keys

        _, builder, mouse_button = self._actions()
        btn = mouse_button.RIGHT if button == "right" else mouse_button.LEFT
        keys = [k for k, on in ((Keys.SHIFT, shift), (Keys.CONTROL, ctrl)) if on]
        kb, ptr = builder.key_action, builder.pointer_action
        for k in keys:
            kb.key_down(k)
            ptr.pause(0)
        for step in (lambda: ptr.move_to_location(int(x), int(y)), lambda: ptr.pointer_down(btn),
                     lambda: ptr.pointer_up(btn)):
            step()
            kb.pause(0)
        for k in keys:
            kb.key_up(k)
            ptr.pause(0)
        builder.perform()

    def drag(self, x0: int, y0: int, x1: int, y1: int, steps: int = 8) -> None:
        """Left-button drag between viewport coordinates, with intermediate moves."""
        _, builder, mouse_button = self._actions()
        p = builder.pointer_action
        p.move_to_location(int(x0), int(y0))
        p.pointer_down(mouse_button.LEFT)
        for i in range(1, steps + 1):
            p.move_to_location(int(round(x0 + (x1 - x0) * i / steps)), int(round(y0 + (y1 - y0) * i / steps)))
        p.pointer_up(mouse_button.LEFT)
        builder.perform()

    def press(self, key: str, ctrl: bool = False, shift: bool = False) -> None:
        """Type one key on the focused element (window keybindings see it), optionally with ctrl/shift held."""
        from selenium.webdriver.common.keys import Keys

        chain, _, _ = self._actions()
        mods = [k for k, on in ((Keys.CONTROL, ctrl), (Keys.SHIFT, shift)) if on]
        for k in mods:
            chain.key_down(k)
        chain.send_keys(key)
        for k in reversed(mods):
            chain.key_up(k)
        chain.perform()
