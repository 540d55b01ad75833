"""rollnet report: one self-contained HTML page, checked in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rollnet.cli import EXIT_ERROR, main
from rollnet.plots.report import Report, RunSummary, render_html
from rollnet.train import TrainConfig, apply_overrides, train
from rollnet.train.evaluation import NORMS, RegionReport
from tests.plots.helpers import distinct_colours, png_size
from tests.threads import intra_op_threads

RUNS = (("vanilla", 0.0), ("roll<C=1>", 1.0))  # the second name needs escaping


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    out = []
    with intra_op_threads(1):
        for i, (name, lam) in enumerate(RUNS):
            cfg = apply_overrides(TrainConfig(), [
                f"name={name}", "data.name=moons", "data.n=200", "model.hidden=[8,8]", "epochs=3",
                "progress=false", "val_margin_samples=0", "optim.name=adam", "optim.lr=0.02",
                f"roll.lam={lam}", "roll.C=1"])
            train(cfg, root / f"run{i}", log=lambda m: None)
            out.append(root / f"run{i}")
    return out


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    with intra_op_threads(1):
        status = main(["report", *map(str, runs), "-o", str(out), "--distortion", "0.05", "--samples", "16",
                       "--population", "12", "--generations", "2"])
    assert status == 0
    return out


class _Text(HTMLParser):
    """The rendered DOM's text per table id, the <img> sources and all the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(markup: str) -> _Text:
    parser = _Text()
    parser.feed(markup)
    return parser


def test_the_page_is_self_contained_and_holds_every_table(page):
    markup = page.read_text(encoding="utf-8")
    assert markup.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", markup), \
        "the page must load nothing from anywhere"
    assert "<script" not in markup
    assert re.search(r"best val_acc \d+\.\d\d%", markup), "accuracies are printed as percentages"
    parsed = _parse(markup)
    assert "roll&lt;C=1&gt;" in markup and "roll<C=1>" not in markup, "names are escaped"
    names = {row[0] for row in parsed.tables["regions-table"][2:]}
    assert names == {name for name, _ in RUNS}
    dist = parsed.tables["distortion-table"]
    assert dist[0][:3] == ["model", "P@1", "P@5"] and dist[0][-1] == "label changes"
    assert [row[0] for row in dist[2:]] == [name for name, _ in RUNS]
    assert all(row[2] == "n/a" for row in dist[2:]), "moons has 2 classes: no P@5"
    assert len(parsed.images) == 2, "margin CDF and the 2-D regions"
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(parsed.text)
    assert "command: " in text and "rollnet report" in text and " UTC" in text
    assert "λ = 1, C = 1" in text and "vanilla (λ = 0)" in text


def test_in_a_real_browser_the_page_renders_tables_and_pictures(page, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found (Debian: apt-get install chromium; `make test` installs it as root)")
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    shot = tmp_path / "shot.png"
    done = subprocess.run([*common, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90)
    assert done.returncode == 0 and shot.is_file(), done.stderr.decode(errors="replace")[-2000:]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, timeout=90)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    rendered = _parse(dom.stdout.decode("utf-8"))
    for table in ("regions-table", "distortion-table"):
        assert [row[0] for row in rendered.tables[table][2:]] == [name for name, _ in RUNS], table
    text = " ".join(rendered.text)
    for name, _ in RUNS:
        assert name in text
    assert "Linear regions and margins" in text and "Gradient distortion" in text

    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(str(shot))[..., :3]
    assert img.shape[:2] == (2000, 1280)
    non_white = float((img.min(axis=2) < 0.95).mean())
    assert non_white > 0.10, f"only {non_white:.1%} of the screenshot is not white: blank page?"
    assert float(img.std()) > 0.1
    header = img[:60]
    assert float(header.mean()) < 0.6 and float(header[..., 2].mean()) > float(header[..., 0].mean()), \
        "the blue header (inline CSS) is not drawn"
    assert distinct_colours(shot) > 200, "pictures and tables make many colours"
    assert np.isfinite(img).all()


def test_render_html_groups_percentile_columns():
    q = {"P25": 1.0, "P50": 2.0, "P75": 3.0, "P100": 4.0}
    r = RegionReport("m", "test", 2, 0.5, 2, 2, "normalized", {"normalized": 1.0, "pixel": 0.3},
                     {u: {k: q for k in NORMS} for u in ("normalized", "pixel")}, "float64", 0.1)
    markup = render_html(Report([RunSummary("m", Path("runs/m/best.json"), [("data", "d")], {"a": 1})], [r], None))
    table = _parse(markup).tables["regions-table"]
    assert table[0] == ["model", "accuracy", "patterns", "Jacobians", "units", "l1 margin", "l2 margin", "l∞ margin"]
    assert table[1] == ["P25", "P50", "P75", "P100"] * 3
    assert table[2][:5] == ["m", "50.00%", "2", "2", "normalized"] and table[3][0] == "pixel", \
        "one model's rows share its name, accuracy and counts"
    assert 'rowspan="2"' in markup and "Gradient distortion" not in markup


def test_report_errors_are_clear(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "missing"), "-o", str(out)]) == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert main(["report", str(runs[0]), "-o", str(out), "--limit", "0"]) == EXIT_ERROR
    assert "limit must be positive" in capsys.readouterr().err


def test_same_names_are_told_apart(runs, tmp_path):
    out = tmp_path / "same.html"
    with intra_op_threads(1):
        assert main(["report", str(runs[0]), str(runs[0] / "last.json"), "-o", str(out), "--limit", "10",
                     "--no-pictures"]) == 0
    assert "data:image" not in out.read_text() and 'id="figures"' not in out.read_text()
    table = _parse(out.read_text()).tables["regions-table"]
    assert [row[0] for row in table[2:]] == ["vanilla (run0/best)", "vanilla (run0/last)"]


def test_a_slice_with_too_many_regions_becomes_a_note(runs, tmp_path):
    from rollnet.plots.report import build_report

    with intra_op_threads(1):
        report = build_report(runs, limit=10, max_regions=2)
    (regions,) = [f for f in report.figures if f.title.startswith("Linear regions")]
    assert regions.png is None and "2" in (regions.note or "")
    markup = render_html(report)
    assert "Not drawn: " in markup and markup.count("data:image/png;base64,") == 1


def test_image_runs_get_a_plane_slice_and_saliency_maps(tmp_path):
    from rollnet.plots.report import build_report

    with intra_op_threads(1):
        cfg = apply_overrides(TrainConfig(), ["name=digits_tiny", "data.name=digits", "model.hidden=[16]",
                                              "epochs=1", "progress=false", "val_margin_samples=0"])
        train(cfg, tmp_path / "run", log=lambda m: None)
        report = build_report([tmp_path / "run"], limit=6, distortion=0.03125, saliency_examples=3,
                              distortion_options={"n_samples": 8, "population": 8, "generations": 2})
    titles = [f.title for f in report.figures]
    assert titles == ["l2 margin distributions", "Plane slice through test image 0 (digits)",
                      "Saliency maps (digits)"]
    for figure in report.figures:
        assert figure.png is not None and figure.png[:8] == b"\x89PNG\r\n\x1a\n", figure.title
    (dist,) = report.distortions or []
    assert dist.eps_units == "pixel" and dist.clamp is not None and dist.n == 6
    assert "worst-case point" in report.figures[2].caption


def test_a_sequence_run_gets_the_stability_picture_that_rollnet_plot_draws(tmp_path):
    from rollnet.plots.report import build_report
    from rollnet.train import train
    from tests.train.helpers import quiet, tiny_vowels_config

    with intra_op_threads(1):
        train(tiny_vowels_config("epochs=1"), tmp_path / "vowels", log=quiet)
        report = build_report([tmp_path / "vowels"], limit=10)
        cli_png = tmp_path / "cli.png"
        assert main(["plot", "stability", str(tmp_path / "vowels"), "-o", str(cli_png), "--limit", "10"]) == 0
    (figure,) = [f for f in report.figures if f.title == "Stability bounds of sequences"]
    assert figure.png is not None and "channel 0" in figure.caption
    shown = tmp_path / "report.png"
    shown.write_bytes(figure.png)
    assert png_size(shown) == png_size(cli_png) == (1200, 432)
    assert figure.png == cli_png.read_bytes(), "the same sequences, bounds and drawing as `rollnet plot stability`"
