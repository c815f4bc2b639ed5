"""The HTML report in a real headless browser (Debian's chromium): no script errors, figures drawn, not blank."""
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image

from report_runs import digits_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; "
                                                         ".ci/run installs it)")

# Injected into a copy of the report: records script errors from the first moment, then measures every figure.
PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));</script>"""
PROBE_BODY = """<script>window.addEventListener('load', () => {
  const figures = [...document.querySelectorAll('figure.plot')].map(f => {
    const svg = f.querySelector('svg'); const box = svg ? svg.getBoundingClientRect() : null;
    return {cls: f.className, svg: !!svg, width: box ? box.width : 0, height: box ? box.height : 0,
            marks: svg ? svg.querySelectorAll('circle,rect,path,polyline,polygon,line').length : 0};
  });
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({errors: window.__errors, figures});
  document.body.appendChild(pre);
});</script>"""


def chromium(*args, user_dir) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_dir}",
             "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    result, _ = digits_run()
    path = folder / "report.html"
    result.report("html", to=path)
    return result, path


def test_figures_are_drawn_without_script_errors(page, tmp_path):
    result, path = page
    html = path.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</head>", PROBE_HEAD + "</head>").replace("</body>", PROBE_BODY + "</body>"))
    done = chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri(), user_dir=tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S).group(1).replace("&amp;", "&"))
    assert probe["errors"] == []
    kinds = [f["cls"].split()[-1] for f in probe["figures"]]
    assert kinds.count("front") == 1 and kinds.count("hv") == 1 and kinds.count("bars") == 1
    assert kinds.count("heat") >= 2  # kept channels and weight bits at least
    for figure in probe["figures"]:
        assert figure["svg"] and figure["width"] > 150 and figure["height"] > 60, figure
        assert figure["marks"] >= 5, figure
    front = next(f for f in probe["figures"] if f["cls"].endswith("front"))
    assert front["marks"] >= len(result.trials)  # a mark per finished trial, plus the frame, grid and baseline


def test_screenshot_is_not_blank(page, tmp_path):
    _, path = page
    shot = tmp_path / "shot.png"
    done = chromium("--window-size=1280,1600", f"--screenshot={shot}", path.as_uri(), user_dir=tmp_path / "profile")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")  # Pillow comes with torchvision
    assert image.size == (1280, 1600)
    counts = image.getcolors(maxcolors=1 << 24)  # [(count, (r, g, b)), ...]
    background = max(counts)[0]
    inked = 1 - background / (1280 * 1600)
    blue = sum(c for c, (r, g, b) in counts if b > 180 and r < 90 and 90 < g < 160)  # the front's #1a73e8 marks
    assert len(counts) > 50 and inked > 0.05 and blue > 200, (len(counts), inked, blue)
