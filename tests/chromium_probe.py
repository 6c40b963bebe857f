"""What a person sees: a page laid out by headless Chromium at a given width, measured by a script that
runs after the page has loaded (the document's scroll width, each image and table, the paper table's rows),
and a screenshot. Skips when Chromium is not installed (.ci/run installs Debian's chromium)."""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

PROBE = """<script>window.addEventListener('load', () => {
  const d = document.documentElement, paper = document.querySelector('table#paper-table');
  const out = {scrollWidth: d.scrollWidth, clientWidth: d.clientWidth,
    images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, natural: i.naturalWidth,
                                             shown: Math.round(i.getBoundingClientRect().width)})),
    overflowing: [...document.querySelectorAll('table')].filter(t => t.getBoundingClientRect().right > d.clientWidth).length,
    paper: paper ? [...paper.tBodies[0].rows].map(r => r.cells[0].textContent) : null,
    body: Math.round(document.body.getBoundingClientRect().width)};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def chromium_sees(html_path: Path, tmp_path: Path, width: int = 1400) -> tuple[dict, Path]:
    """What headless Chromium lays out at ``width`` px (measured by a script run on a copy of the page after
    load), and a screenshot of the top of the page."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},2000"]
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([*args, "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run: {dom[-500:]!r}"
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", html_path.resolve().as_uri()], capture_output=True, timeout=120,
                   check=True)
    return json.loads(html.unescape(found[1])), shot


def assert_not_blank(shot: Path, size: tuple[int, int]):
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == size
        colors = rgb.getcolors(1 << 22)
        white = sum(n for n, c in colors if min(c) >= 250)
        assert len(colors) > 100, "the screenshot has almost no colours: blank?"
        assert white < 0.97 * rgb.size[0] * rgb.size[1], "the screenshot is almost all white"
