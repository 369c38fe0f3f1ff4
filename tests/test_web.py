"""The fleet page, as a newcomer sees it: `gpufleet up --simulate 8`, a fault, and a real browser."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.wiring import start_up

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def screenshot_dir(tmp_path: Path) -> Path:
    """docs/screenshots when refreshing the README's picture (GPUFLEET_UPDATE_SCREENSHOTS=1), else a temp dir,
    so a test run leaves the checkout as it found it."""
    return SCREENSHOTS if os.environ.get("GPUFLEET_UPDATE_SCREENSHOTS") == "1" else tmp_path


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


# The browser decodes the picture (no imaging library needed) and counts what was drawn: how many distinct
# colours, and the share of the most common one (the background). A blank or invisible page is one colour.
PIXEL_STATS = """(async (src) => {
    const img = new Image();
    img.src = src;
    await img.decode();
    const canvas = document.createElement('canvas');
    canvas.width = img.width;
    canvas.height = img.height;
    const g = canvas.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, img.width, img.height).data;
    const counts = new Map();
    for (let i = 0; i < d.length; i += 4) {
        const k = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
        counts.set(k, (counts.get(k) || 0) + 1);
    }
    let top = 0;
    for (const n of counts.values()) top = Math.max(top, n);
    return {colours: counts.size, background_share: top / (d.length / 4)};
})"""


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def get_text(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.headers.get("content-type", ""), resp.read().decode()


@pytest.fixture
def up_8(tmp_path):
    """`gpufleet up --simulate 8` in a fresh directory, on free ports; yields (collector URL, agent URL, output)."""
    proc, url, agent_url, log = start_up(tmp_path, 8)
    try:
        wait_until(lambda: _gpus(url) == 8, timeout=30)
        yield url, agent_url, log
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def _gpus(url: str) -> int:
    try:
        return len(get_json(url + "/api/v1/gpus")["gpus"])
    except OSError:
        return 0


def test_up_prints_the_fleet_page_and_serves_it(up_8):
    url, _, log = up_8
    assert f"fleet page      {url}/" in log.read_text()
    ctype, body = get_text(url + "/")
    assert ctype.startswith("text/html") and "/web/app.js" in body
    ctype, _ = get_text(url + "/web/app.js")
    assert "javascript" in ctype
    fleet = wait_until(
        lambda: (
            lambda f: f if all(g["sm_active"] is not None for n in f["nodes"] for g in n["gpus"]) else None
        )(get_json(url + "/api/v1/fleet"))
    )  # GPM needs two samples
    assert fleet["totals"]["gpus"] == 8 and [len(n["gpus"]) for n in fleet["nodes"]] == [8]
    g = fleet["nodes"][0]["gpus"][0]
    assert 0 <= g["sm_active"] <= 1 and 0 <= g["utilization"] <= 1 and g["memory_total_bytes"] > 0


def test_the_fleet_page_shows_8_gpus_and_the_injected_xid_in_headless_chromium(
    up_8: tuple[str, str, Path], tmp_path: Path
) -> None:
    from tests.cdp import Chromium

    url, agent_url, _ = up_8
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "simulate",
            "inject",
            "--agent",
            agent_url,
            "--gpu",
            "3",
            "xid",
            "--xid",
            "48",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    wait_until(
        lambda: any(a["rule"] == "GpuXidCritical" for a in get_json(url + "/api/v1/alerts")["alerts"]),
        timeout=20,
    )
    # a few samples for the trend lines before the picture is taken
    wait_until(
        lambda: all(
            len(s["values"]) >= 15
            for s in get_json(
                f"{url}/api/v1/query_range?metric=gpufleet_gpu_sm_active_ratio&start={_now() - 60}&end={_now()}&step=1"
            )["data"]["result"]
        ),
        timeout=30,
    )

    browser = Chromium()
    try:
        browser.viewport(1280, 900)
        browser.navigate(url + "/")
        state = """(() => ({
            gpus: document.querySelectorAll('article.gpu').length,
            alerting: [...document.querySelectorAll('article.gpu.alerting')].map(e => e.dataset.gpu),
            alerts: [...document.querySelectorAll('#alerts .alert')].map(e => e.innerText),
            runbooks: [...document.querySelectorAll('#alerts a.runbook')].map(a => a.href),
            trends: document.querySelectorAll('svg.trend polyline').length,
            totals: document.getElementById('totals')?.innerText,
        }))()"""
        seen: list = []

        def ready():
            seen[:] = [browser.evaluate(state)]
            s = seen[0]
            return s if s["gpus"] == 8 and s["alerts"] and s["trends"] >= 8 else None

        try:
            page = wait_until(ready, timeout=30)
        except AssertionError:
            raise AssertionError(f"the page never showed 8 GPUs, the alert and the trends: {seen}") from None
        assert page["alerting"] == ["3"]
        (xid_alert,) = [a for a in page["alerts"] if "GpuXidCritical" in a]
        assert "XID 48" in xid_alert and "GPU 3" in xid_alert
        assert f"{url}/runbooks/xid-critical" in page["runbooks"]  # served by this collector
        assert "8/8" in page["totals"] or "7/8" in page["totals"]
        card = browser.evaluate("document.querySelector('article.gpu[data-gpu=\"3\"]').innerText")
        assert "GpuXidCritical" in card and "SM active" in card and "utilization" in card and "°C" in card
        shot = screenshot_dir(tmp_path) / "fleet.png"
        browser.screenshot(shot)
        page_height = browser.evaluate("document.documentElement.scrollHeight")

        # on a phone: one column, nothing wider than the screen
        browser.viewport(390, 844, mobile=True, scale=2)
        browser.navigate(url + "/")
        wait_until(
            lambda: browser.evaluate("document.querySelectorAll('article.gpu').length") == 8, timeout=20
        )
        widths = browser.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth, "
            "new Set([...document.querySelectorAll('article.gpu')].map(e => e.offsetLeft)).size]"
        )
        assert widths[0] <= widths[1] and widths[2] == 1, widths

        # the picture just taken shows the whole page as drawn: its full size, cards, trends and colours
        png = shot.read_bytes()
        assert png_size(png) == (1280, page_height) and page_height >= 900
        browser.navigate("about:blank")
        wait_until(lambda: browser.evaluate("location.href") == "about:blank", timeout=10)
        data_url = "data:image/png;base64," + base64.b64encode(png).decode()
        drawn = browser.evaluate(f"{PIXEL_STATS}({json.dumps(data_url)})")
        assert drawn["colours"] >= 200 and drawn["background_share"] < 0.9, drawn
    finally:
        browser.close()


def _now() -> float:
    import time

    return time.time()
