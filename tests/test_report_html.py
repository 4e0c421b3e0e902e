"""report.html (issue 15): a self-contained, valid page with every plot present, redrawn by
``fxprune report`` from report.json; ``fxprune compare`` plots several runs."""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from fxprune.flow.cli import main as cli

VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Check(HTMLParser):
    """Collects images and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[dict[str, str]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")


def _check_page(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = _Check()
    parser.feed(text)
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,"), img["alt"]  # embedded: one self-contained file
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01, img["alt"]  # not blank
    return parser.images


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    out = []
    for method, flops in (("l1", "0.5"), ("l1", "0.3")):
        d = tmp_path_factory.mktemp(f"run-{flops}")
        assert cli(["compile", "--model", "resnet20", "--method", method, "--flops", flops, "--epochs", "1",
                    "--finetune-epochs", "1", "--image-size", "8", "--no-progress", "--out", str(d)]) == 0
        out.append(d)
    return out


def test_every_run_writes_a_valid_page_with_its_plots(runs):
    images = _check_page(runs[0] / "report.html")
    assert {i["alt"] for i in images} == {"kept width per group", "training curves"}  # no latency measured
    text = (runs[0] / "report.html").read_text()
    assert "Groups that were not prunable" in text and "reaches the graph output" in text


def test_fxprune_report_redraws_the_page_from_report_json(runs):
    page = runs[0] / "report.html"
    page.unlink()
    assert cli(["report", str(runs[0])]) == 0
    assert len(_check_page(page)) == 2


def test_compare_plots_several_runs(runs, tmp_path):
    out = tmp_path / "compare.png"
    assert cli(["compare", *map(str, runs), "--out", str(out)]) == 0
    pixels = matplotlib.image.imread(out)
    assert pixels.std() > 0.01


def test_report_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "has no report.json" in capsys.readouterr().err


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine (chromium / google-chrome)")
def test_the_page_renders_in_a_headless_browser(runs, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run([BROWSER, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1000,2000", (runs[0] / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    assert matplotlib.image.imread(shot).std() > 0.01
