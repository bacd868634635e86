"""The demo's storm in a real trace UI, opened in a real headless browser.

``enginetime demo`` exports its spans to Arize Phoenix (an OTLP backend with a web UI,
installed from PyPI into a cached venv); headless Chromium then loads Phoenix's page of
the storm's trace and of a victim's trace. The test checks what a person looking at
those pages relies on: that the pages render the traces (the browser's DOM after
the page's JavaScript ran names the request), and that the victim's span names the
storm as its top blame with the sidecar's figures. It writes the two screenshots that
docs/OBSERVABILITY.md shows; with ``ENGINETIME_DOCS_IMAGES=1`` it also copies them to
docs/images/ (how the committed ones were made).

Skipped, with the install command, when Chromium is missing (Debian: apt-get install
chromium). Phoenix's venv is built on first use (tests/phoenix_helpers.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import wait_until
from phoenix_helpers import Phoenix

from enginetime.sidecar.telemetry.tracing import REQUEST_SPAN_NAME
from enginetime.testbed.demo import STORM_RID, DemoConfig, run_demo

# Every test here starts processes (a real sidecar, clients, a browser).
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PROJECT = "enginetime-demo"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=15000",  # let the page's JavaScript fetch and draw the trace
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed: apt-get install chromium (Debian) to run the trace-UI check")


def browse(browser: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh profile (nothing shared between runs)."""
    if profile.exists():
        shutil.rmtree(profile)
    return subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(420)  # a demo run (~30 s), Phoenix (+ ~1 min to build it on a cold cache), 2 pages
def test_the_storm_and_a_victim_blaming_it_in_phoenix(tmp_path: Path, monkeypatch) -> None:
    browser = chromium()
    with Phoenix(tmp_path) as phoenix:
        # The demo's sidecar inherits these: spans go out within 100 ms, into their own project.
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={PROJECT}")
        report = run_demo(DemoConfig(otlp_endpoint=phoenix.otlp, compare_policies=False))
        victim = max(report["victims"], key=lambda v: v["interference_s"] or 0)

        def roots() -> dict[str, dict] | None:
            spans = phoenix.spans(PROJECT)
            by_rid = {
                s["attributes"].get("enginetime.request.id"): s
                for s in spans
                if s["parent_id"] is None and s["name"] == REQUEST_SPAN_NAME
            }
            return by_rid if {STORM_RID, victim["request_id"]} <= set(by_rid) else None

        by_rid = wait_until(roots, timeout=30, interval=0.3, message="phoenix never had both spans")
        storm, hit = by_rid[STORM_RID], by_rid[victim["request_id"]]
        # What the victim's page shows, against what the demo got over gRPC.
        attrs = hit["attributes"]
        assert attrs["enginetime.blame.top.request_id"] == STORM_RID
        assert attrs["enginetime.blame.top.shard"] == report["storm"]["shard"]
        assert attrs["enginetime.blame.top.same_shard"] is False
        assert attrs["enginetime.interference"] == pytest.approx(victim["interference_s"], abs=1e-4)
        assert attrs["enginetime.engine_time"] == pytest.approx(victim["engine_time_s"], abs=1e-4)
        assert storm["attributes"]["enginetime.migrated"] is True

        project_id = phoenix.project_id(PROJECT)
        pages = {
            "storm": (storm, 900),
            "victim": (hit, 1750),  # tall enough for the attributes table down to the blame rows
        }
        shots: dict[str, Path] = {}
        for name, (span, height) in pages.items():
            url = f"{phoenix.base}/projects/{project_id}/traces/{span['context']['trace_id']}"
            shot = tmp_path / f"phoenix-{name}.png"
            # One browser run: the DOM after the page's JavaScript ran, and the screenshot of it
            # (the window is tall enough for the rows checked: the table draws only rows in view).
            out = browse(
                browser,
                tmp_path / f"profile-{name}",
                url,
                f"--window-size=1400,{height}",
                "--dump-dom",
                f"--screenshot={shot}",
            )
            assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
            # The page fetched the trace and drew it: its span tree and attributes (the text a
            # person reads; the page splits attribute keys over several elements).
            text = re.sub(r"<[^>]+>", "", out.stdout)
            rid = span["attributes"]["enginetime.request.id"]
            for want in (REQUEST_SPAN_NAME, "prefill", "decode", rid, span["context"]["trace_id"]):
                assert want in text, (name, want)
            if name == "victim":
                assert "enginetime.blame.top.request_id" in text and STORM_RID in text
            data = shot.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000, (name, len(data))  # not blank
            shots[name] = shot
    if os.environ.get("ENGINETIME_DOCS_IMAGES") == "1":
        images = REPO / "docs" / "images"
        images.mkdir(exist_ok=True)
        for name, shot in shots.items():
            shutil.copyfile(shot, images / f"phoenix-{name}.png")
