"""One self-contained HTML page comparing trained runs (``rollnet report``).

The page holds, for the runs given: what each run is (data, model, ROLL
settings, optimiser, checkpoint), the evaluation tables of
:mod:`rollnet.train.evaluation` (the paper's Table-1 layout, or Table-2 for
sequence runs), the gradient-distortion table of
:mod:`rollnet.train.distortion_report` when asked for, and the pictures,
embedded as base64 PNG data URIs:

- the CDF of every run's l2 margins (:func:`rollnet.plots.plot_margin_cdf`);
- 2-D runs: their exact linear regions side by side (:func:`rollnet.plots.plot_regions`);
- image runs: the exact regions of a plane slice through a test image
  (:func:`rollnet.plots.plane.plot_plane`) and saliency maps of the first test
  images, with ``distortion`` also at their worst-case points
  (:func:`rollnet.plots.saliency.plot_saliency`);
- sequence runs: per-step stability bounds at the P50 and P75 of the l2 margin
  (:func:`rollnet.plots.plot_stability_bounds`).

Styles are inline; the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rollnet.train.config import config_to_dict
from rollnet.train.distortion_report import (
    DistortionReport,
    describe_distortion,
    distortion_report,
    distortion_rows,
)
from rollnet.train.evaluation import (
    LoadedRun,
    RegionReport,
    describe,
    load_run,
    region_report,
    table_rows,
)

__all__ = ["Figure", "Report", "RunSummary", "build_report", "render_html", "write_report"]

# matplotlib's default cycle ("C0".."C9"): each run's colour in the pictures, used for its card too.
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_SPLITS = ("train", "val", "test")


@dataclass
class Figure:
    """One picture of the report.

    Attributes:
        title: heading above the picture.
        caption: what it shows.
        png: the PNG bytes, or ``None`` when it could not be drawn (see ``note``).
        note: why it is missing (e.g. too many regions), or ``None``.
        wide: spans the page's width (panels side by side).
    """

    title: str
    caption: str
    png: bytes | None
    note: str | None = None
    wide: bool = False


@dataclass
class RunSummary:
    """What one run is.

    Attributes:
        name: the run's label in every table and picture (unique within the report).
        manifest: path of the checkpoint manifest read.
        facts: ``(label, value)`` pairs shown on the run's card (data, model, ROLL, ...).
        config: the run's full config (as saved).
    """

    name: str
    manifest: Path
    facts: list[tuple[str, str]]
    config: dict[str, Any]


@dataclass
class Report:
    """Everything the page shows (build with :func:`build_report`, render with :func:`render_html`).

    Attributes:
        runs: one summary per run, in the order given.
        regions: one :class:`~rollnet.train.evaluation.RegionReport` per run.
        distortions: one :class:`~rollnet.train.distortion_report.DistortionReport`
            per run, or ``None`` without ``distortion``.
        figures: the pictures, in page order.
        split: the split evaluated.
        generated: when the report was made (UTC, ISO 8601).
        command: the command line that made it, or ``None``.
        title: the page title.
    """

    runs: list[RunSummary]
    regions: list[RegionReport]
    distortions: list[DistortionReport] | None
    figures: list[Figure] = field(default_factory=list)
    split: str = "test"
    generated: str = ""
    command: str | None = None
    title: str = "rollnet report"


# -- building ------------------------------------------------------------------------------------


def _model_text(m: dict[str, Any]) -> str:
    arch = m.get("arch", "mlp")
    if arch == "mlp":
        text = f"MLP, hidden {m.get('hidden')}, {m.get('act')}"
        if m.get("dropout"):
            text += f", dropout {m['dropout']}"
        return text
    if arch == "resnet":
        return f"ResNet, width {m.get('width')}, blocks {m.get('blocks')}"
    return f"{'Elman RNN' if arch == 'elman' else 'scoRNN'}, {m.get('hidden_size')} units, {m.get('act')}"


def _roll_text(r: dict[str, Any]) -> str:
    if not r.get("lam"):
        return "vanilla (λ = 0)"
    text = f"λ = {r['lam']:g}, C = {r.get('C', 0):g}, γ = {r.get('gamma')}"
    if r.get("approx"):
        text += f", approximate: {r['approx']} {r.get('estimator', 'axes')} directions"
    else:
        text += ", exact"
    return text


def _summary(loaded: LoadedRun, manifest: Path, content: dict[str, Any], name: str) -> RunSummary:
    cfg = config_to_dict(loaded.config)
    info = loaded.info
    optim = cfg["optim"]
    opt = f"{optim['name']}, lr {optim['lr']:g}"
    if optim["name"] == "sgd" and optim.get("momentum"):
        opt += f", momentum {optim['momentum']:g}{' (Nesterov)' if optim.get('nesterov') else ''}"
    trainer = content.get("trainer") or {}
    best = trainer.get("best") or {}
    checkpoint = f"{content.get('kind', manifest.stem)}.json, epoch {trainer.get('epoch', '?')}, step {content.get('step')}"
    if best.get("metric") and isinstance(best.get("value"), (int, float)):
        value = f"{100 * best['value']:.2f}%" if "acc" in str(best["metric"]) else f"{best['value']:.4g}"
        checkpoint += f"; best {best['metric']} {value}"
    data = f"{info.name}, input {list(info.input_shape)}, {info.num_classes} classes, {info.model_units} units"
    facts = [
        ("data", data),
        ("model", _model_text(cfg["model"])),
        ("ROLL", _roll_text(cfg["roll"])),
        ("optimiser", f"{opt}; {cfg['epochs']} epochs, batch {cfg['batch_size']}"),
        ("checkpoint", checkpoint),
    ]
    if content.get("saved_at"):
        facts.append(("saved", str(content["saved_at"])))
    return RunSummary(name=name, manifest=manifest, facts=facts, config=cfg)


def _unique_names(names: Sequence[str], paths: Sequence[Path]) -> list[str]:
    """Run names, made unique where two coincide: with their directory, then the manifest, then a number.

    >>> _unique_names(["a", "a", "b"], [Path("x/best.json"), Path("y/best.json"), Path("z/best.json")])
    ['a (x)', 'a (y)', 'b']
    """
    out = list(names)
    for i, n in enumerate(names):
        if names.count(n) > 1:
            out[i] = f"{n} ({paths[i].parent.name})"
    first = list(out)
    for i, n in enumerate(first):
        if first.count(n) > 1:
            out[i] = f"{names[i]} ({paths[i].parent.name}/{paths[i].stem})"
    second = list(out)
    for i, n in enumerate(second):
        if second.count(n) > 1:
            out[i] = f"{n} #{i + 1}"
    return out


def _png(draw: Callable[[Path], Path]) -> bytes:
    """Run a plotting function on a temporary path and return the PNG's bytes."""
    with tempfile.TemporaryDirectory(prefix="rollnet-report-") as tmp:
        return draw(Path(tmp) / "figure.png").read_bytes()


def _margin_figure(regions: Sequence[RegionReport]) -> Figure:
    from rollnet.plots.margins import plot_margin_cdf

    pixel = all("pixel" in r.scales for r in regions)
    units = "pixel" if pixel else (regions[0].model_units if len({r.model_units for r in regions}) == 1
                                   else "model input")
    margins: dict[str, list[float]] = {}
    for r in regions:
        assert r.per_example is not None
        scale = r.scales["pixel"] if pixel else 1.0
        margins[r.model] = [v * scale for v in r.per_example["l2"]]
    png = _png(lambda p: plot_margin_cdf(margins, p, norm="l2", units=f"{units} units",
                                         title=f"l2 margins, {regions[0].split} split"))
    return Figure("l2 margin distributions", "Empirical CDF of each run's certified l2 margin (log scale); the "
                  "dot marks the median. A curve further right means larger linear regions around the "
                  f"examples. Radii in {units} units.", png)


def _regions_figure(items: Sequence[tuple[str, LoadedRun, Tensor, Tensor]], max_regions: int) -> Figure:
    from rollnet.evaluate.plane import TooManyRegionsError
    from rollnet.plots.regions import plot_regions, toy_slice

    title = "Linear regions of the 2-D runs"
    caption = ("The exact linear regions of each 2-D run over its data's bounding box (each region its own "
               "colour), the decision boundary in black and the evaluated points.")
    try:
        panels = [(name, toy_slice(run.model, x.to(run.device), max_regions=max_regions))
                  for name, run, x, _ in items]
    except TooManyRegionsError as err:
        return Figure(title, caption, None, note=str(err), wide=True)
    x, y = items[0][2], items[0][3]
    png = _png(lambda p: plot_regions(panels, p, points=x.detach().cpu(), labels=y.detach().cpu()))
    return Figure(title, caption, png, wide=len(panels) > 1)


def _stability_figure(items: Sequence[tuple[str, LoadedRun, Any, RegionReport]], channel: int) -> Figure:
    from rollnet.plots.runs import stability_panels
    from rollnet.plots.stability import plot_stability_bounds

    sequences = []
    for name, run, part, report in items:
        assert report.per_example is not None
        sequences.append((name, run.model, part.x, part.lengths, report.per_example["l2"]))
    panels = stability_panels(sequences, channel)
    units = items[0][3].model_units
    png = _png(lambda p: plot_stability_bounds(panels, p, channel=channel, units=f"{units} units"))
    return Figure("Stability bounds of sequences",
                  f"How far channel {channel} may move at each time step alone without changing the activation "
                  "pattern, for the sequences at the P50 and P75 of each run's l2 margin (the paper's figure 3).",
                  png, wide=True)


def _image_groups(items: Sequence[tuple[str, LoadedRun, Any, RegionReport]], k: int
                  ) -> list[list[tuple[str, LoadedRun, Any, RegionReport]]]:
    """Image runs grouped by the examples they are evaluated on (the same first ``k`` images)."""
    groups: list[list[tuple[str, LoadedRun, Any, RegionReport]]] = []
    for item in items:
        x = item[2].x[:k]
        for group in groups:
            other = group[0][2].x[:k]
            if other.shape == x.shape and bool(torch.equal(other.cpu(), x.cpu())):
                group.append(item)
                break
        else:
            groups.append([item])
    return groups


def _plane_figure(group: Sequence[tuple[str, LoadedRun, Any, RegionReport]], max_regions: int) -> Figure:
    from rollnet.evaluate.plane import TooManyRegionsError
    from rollnet.plots.plane import image_plane, plot_plane

    part = group[0][2]
    x, label = part.x[0], int(part.y[0])
    margins = [float(rep.per_example["l2"][0]) for _, _, _, rep in group if rep.per_example is not None]
    finite = [m for m in margins if math.isfinite(m) and m > 0]
    title = f"Plane slice through test image 0 ({group[0][1].info.name})"
    units = group[0][1].info.model_units
    if not finite:
        return Figure(title, "", None, note="no run has a finite positive l2 margin at this image to size the slice")
    # In a random plane the hyperplanes lie far beyond the margin (the nearest one in the worst
    # direction of the whole input space): at 100 margins an MNIST MLP shows about a hundred
    # regions.  The same square for every run, sized by the smallest margin; a quarter of it
    # (at most three times) when a run crosses more than max_regions there.
    half = 100.0 * min(finite)
    for attempt in range(4):
        try:
            panels = [(name, image_plane(run.model, x.to(run.device), target=label, half_width=half,
                                         max_regions=max_regions)) for name, run, _, _ in group]
            break
        except TooManyRegionsError as err:
            if attempt == 3:
                return Figure(title, "", None, note=str(err), wide=True)
            half /= 4.0
    caption = (f"The exact linear regions of the plane through the image spanned by the gradient of its true "
               f"class ({label}) and a random direction (seeded), over the same square of half side {half:.3g} "
               f"{units} units for every run ({half / min(finite):.3g} times the smallest l2 margin of the runs at "
               "this image); the dashed circle is the certified l2 margin, the black lines the decision boundary.")
    png = _png(lambda p: plot_plane(panels, p, units=f"{units} units"))
    return Figure(title, caption, png, wide=len(panels) > 1)


def _saliency_figure(group: Sequence[tuple[str, LoadedRun, Any, RegionReport]], k: int,
                     dists: dict[str, DistortionReport], options: dict[str, Any]) -> Figure:
    from rollnet.evaluate import default_explanation
    from rollnet.plots.saliency import SaliencyColumn, plot_saliency, spread, worst_case_columns
    from rollnet.train.distortion_report import pixel_box

    part = group[0][2]
    pick = spread(part.x.shape[0], min(k, part.x.shape[0]))
    x, y = part.x[pick], part.y[pick]
    columns = []
    for name, run, _, _ in group:
        xd, yd = x.to(run.device), y.to(run.device)
        dist = dists.get(name)
        if dist is None:
            columns.append(SaliencyColumn(f"{name} at x", default_explanation(run.model, xd, yd).cpu()))
            continue
        generator = torch.Generator(device=run.device).manual_seed(int(options.get("seed", 0)))
        search = {key: options[key] for key in ("population", "generations") if key in options}
        columns += worst_case_columns(name, run.model, xd, yd, dist.eps_model,
                                      method=str(options.get("method", "genetic")), budget=options.get("budget"),
                                      clamp=pixel_box(run.info), generator=generator, **search)
    split = group[0][3].split
    rows = [f"{split} {int(i)}, label {int(v)}" for i, v in zip(pick, y, strict=True)]
    png = _png(lambda p: plot_saliency(x.cpu(), columns, p, row_labels=rows))
    caption = ("Saliency maps (|gradient of the true-class logit| summed over channels, clipped at the 99th "
               "percentile) of test images spread evenly over the split")
    if dists:
        d = next(iter(dists.values()))
        caption += (f", at the image and at the worst-case point the search found in the l_inf ball of "
                    f"{d.eps:.4g} {d.eps_units} units (the paper's figure 4)")
    return Figure(f"Saliency maps ({group[0][1].info.name})", caption + ".", png, wide=True)


def build_report(
    paths: Sequence[str | Path], *, split: str = "test", limit: int | None = None,
    distortion: float | None = None, distortion_options: dict[str, Any] | None = None,
    device: str = "cpu", batch_size: int = 250, float64: bool = True, figures: bool = True,
    command: str | None = None, max_regions: int = 2000, channel: int = 0, saliency_examples: int = 4,
) -> Report:
    """Evaluate the runs and draw the pictures of the report.

    Args:
        paths: run directories (their ``best.json``) or manifests, at least one.
        split: ``test`` (default), ``val`` or ``train``.
        limit: only the first ``limit`` examples of the split.
        distortion: with a radius, also the gradient-distortion table
            (:func:`rollnet.train.distortion_report.distortion_report`; in
            pixel units for image data).
        distortion_options: keyword arguments for ``distortion_report``
            (``units``, ``n_samples``, ``method``, ``budget``, ``population``,
            ``generations``, ``seed``).
        device: ``cpu`` or ``cuda``.
        batch_size: examples per pass.
        float64: certify the margins in float64 (default) or the model's precision.
        figures: draw the pictures (default ``True``).
        command: the command line, shown in the header.
        max_regions: limit of regions of a region picture (2-D runs, image
            plane slices); past it the picture is replaced by a note (default 2000).
        channel: the channel of the sequence pictures.
        saliency_examples: images in the saliency picture of image runs (default 4).

    Returns:
        The :class:`Report`.

    Raises:
        CheckpointError: a missing, damaged or mismatched run.
        ValueError: no runs, an unknown split or a non-positive limit.
    """
    if not paths:
        raise ValueError("a report needs at least one run")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    loaded = [load_run(p, device) for p in paths]
    manifests = [Path(p) if Path(p).is_file() else _manifest_of(Path(p)) for p in paths]
    names = _unique_names([run.config.name for run in loaded], manifests)
    parts = [getattr(run.data, split).head(limit) for run in loaded]
    runs, regions, distortions = [], [], []
    for name, run, part, manifest in zip(names, loaded, parts, manifests, strict=True):
        content = json.loads(manifest.read_text(encoding="utf-8"))
        runs.append(_summary(run, manifest, content, name))
        lengths = getattr(part, "lengths", None)
        regions.append(region_report(run.model, part.x, part.y, run.info, label=name, split=split,
                                     batch_size=batch_size, float64=float64, device=run.device,
                                     lengths=lengths))
        if distortion is not None:
            distortions.append(distortion_report(run.model, part.x, part.y, run.info, distortion, label=name,
                                                 split=split, device=run.device, lengths=lengths,
                                                 **(distortion_options or {})))
    pictures: list[Figure] = []
    if figures:
        pictures.append(_margin_figure(regions))
        flat = [(n, r, p.x, p.y) for n, r, p in zip(names, loaded, parts, strict=True)
                if tuple(r.info.input_shape) == (2,)]
        if flat:
            pictures.append(_regions_figure(flat, max_regions))
        seqs = [(n, r, p, rep) for n, r, p, rep in zip(names, loaded, parts, regions, strict=True) if rep.sequence]
        if seqs:
            pictures.append(_stability_figure(seqs, channel))
        images = [(n, r, p, rep) for n, r, p, rep in zip(names, loaded, parts, regions, strict=True)
                  if len(r.info.input_shape) == 3 and len(p.x) > 0]
        by_name = {d.model: d for d in distortions}
        search = {"method": "genetic", "seed": 0, "population": 4800, "generations": 30,
                  **{k: v for k, v in (distortion_options or {}).items() if k != "n_samples" and v is not None}}
        for group in _image_groups(images, saliency_examples):
            pictures.append(_plane_figure(group, max_regions))
            pictures.append(_saliency_figure(group, saliency_examples, by_name, search))
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Report(runs=runs, regions=regions, distortions=distortions if distortion is not None else None,
                  figures=pictures, split=split, generated=generated, command=command)


def _manifest_of(directory: Path) -> Path:
    from rollnet.train.checkpoint import load_manifest

    return load_manifest(directory).path


# -- rendering -----------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --border: #d8dee4; --soft: #f6f8fa; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header.top { background: linear-gradient(120deg, #0a2e5c, #0b5cad 70%, #1f7ad1); color: #fff; padding: 30px 0 26px; }
.wrap { max-width: 1320px; margin: 0 auto; padding: 0 28px; }
header.top h1 { margin: 0 0 6px; font-size: 30px; font-weight: 650; letter-spacing: -0.01em; }
header.top .meta { margin: 0; color: #d6e6f7; font-size: 14px; }
header.top code { background: rgba(255, 255, 255, 0.14); color: #fff; padding: 2px 6px; border-radius: 4px;
  font-size: 13px; overflow-wrap: anywhere; }
nav.toc { margin-top: 14px; font-size: 14px; }
nav.toc a { color: #fff; text-decoration: none; margin-right: 18px; border-bottom: 1px solid rgba(255,255,255,.4); }
main.wrap { padding-bottom: 40px; }
h2 { font-size: 22px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--border); }
p.lead { color: var(--muted); margin: 0 0 14px; max-width: 980px; font-size: 15px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; }
.card { border: 1px solid var(--border); border-radius: 10px; padding: 14px 18px 10px; background: #fff;
  border-top: 5px solid var(--run); box-shadow: 0 1px 2px rgba(31, 35, 40, 0.06); }
.card h3 { margin: 0 0 2px; font-size: 18px; }
.card .path { color: var(--muted); font-size: 12.5px; word-break: break-all; margin: 0 0 8px; }
.stats { display: flex; gap: 10px; margin: 2px 0 10px; }
.stat { flex: 1 1 0; background: var(--soft); border-radius: 8px; padding: 6px 10px; }
.stat .value { display: block; font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; }
.stat .label { display: block; font-size: 12px; color: var(--muted); line-height: 1.3; }
.card dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0 0 8px; font-size: 14px; }
.card dt { color: var(--muted); }
.card dd { margin: 0; }
details { font-size: 13px; margin: 4px 0 6px; }
details summary { cursor: pointer; color: var(--accent); }
details pre { background: var(--soft); border-radius: 6px; padding: 10px; overflow-x: auto; max-height: 360px; }
.table-wrap { overflow-x: auto; border: 1px solid var(--border); border-radius: 10px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 6px; border-bottom: 1px solid var(--border); white-space: nowrap; }
thead th { background: var(--soft); font-weight: 600; text-align: center; color: #32383f; }
thead th.group { border-bottom: 1px solid #c7d0d9; }
thead th.left { text-align: left; }
tbody tr:last-child td { border-bottom: none; }
tbody tr:hover td { background: #f3f8fe; }
td.num { text-align: right; }
td.name { font-weight: 600; }
td.name .dot, .legend .dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%;
  margin-right: 7px; background: var(--run); vertical-align: 0; }
td.first-of-run { border-top: 2px solid #c7d0d9; }
.figures { display: flex; flex-wrap: wrap; gap: 20px; }
figure { flex: 1 1 560px; min-width: 0; margin: 0; border: 1px solid var(--border); border-radius: 10px; padding: 14px 16px; background: #fff; }
figure h3 { margin: 0 0 8px; font-size: 17px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figure.wide { flex-basis: 100%; }
figcaption { color: var(--muted); font-size: 14px; margin-top: 8px; }
.note { background: #fff8e5; border: 1px solid #f0d58a; border-radius: 8px; padding: 10px 14px; font-size: 14px; }
footer { color: var(--muted); font-size: 13px; border-top: 1px solid var(--border); padding: 14px 0 30px; }
"""

_NUMBER = re.compile(r"^[-+]?(\d|\.\d|inf|nan|n/a)")
_QUANTILE = re.compile(r"^(.*?) ?(P\d+)( \(.*\))?$")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _header_rows(head: Sequence[str]) -> str:
    """Two header rows: percentile columns grouped under their measure (``l2 P50`` under ``l2``)."""
    groups: list[tuple[str, list[str]]] = []  # (group, [sub]) ; sub empty: a column of its own
    for h in head:
        m = _QUANTILE.match(h)
        if m and m.group(1):
            group = m.group(1) + (m.group(3) or "")
            if groups and groups[-1][0] == group and groups[-1][1]:
                groups[-1][1].append(m.group(2))
            else:
                groups.append((group, [m.group(2)]))
        else:
            groups.append((h, []))
    if not any(subs for _, subs in groups):
        return "<tr>" + "".join(f'<th class="left">{_e(h)}</th>' for h in head) + "</tr>"
    top, bottom = [], []
    for group, subs in groups:
        if subs:
            top.append(f'<th class="group" colspan="{len(subs)}">{_e(_pretty(group))}</th>')
            bottom += [f"<th>{_e(s)}</th>" for s in subs]
        else:
            top.append(f'<th rowspan="2" class="left">{_e(group)}</th>')
    return "<tr>" + "".join(top) + "</tr><tr>" + "".join(bottom) + "</tr>"


def _pretty(group: str) -> str:
    names = {"l1": "l1 margin", "l2": "l2 margin", "linf": "l∞ margin",
             "expected": "expected distortion", "worst-case": "worst-case distortion"}
    for key, value in names.items():
        if group == key or group.startswith(key + " "):
            return value + group[len(key):]
    return group


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], colours: dict[str, str], *,
           table_id: str, merge: int = 1) -> str:
    """An HTML table; the first ``merge`` cells of consecutive rows of one model span those rows."""
    body = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and list(rows[j + 1][:merge]) == list(rows[i][:merge]):
            j += 1
        for k in range(i, j + 1):
            cells = []
            for c, value in enumerate(rows[k]):
                if c < merge and k > i:
                    continue
                span = f' rowspan="{j - i + 1}"' if c < merge and j > i else ""
                classes = []
                if c == 0:
                    classes.append("name")
                elif _NUMBER.match(value):
                    classes.append("num")
                if k == i and i > 0:
                    classes.append("first-of-run")
                cls = f' class="{" ".join(classes)}"' if classes else ""
                if c == 0:
                    colour = colours.get(value, "#888")
                    cells.append(f'<td{cls}{span} style="--run: {colour}"><span class="dot"></span>{_e(value)}</td>')
                else:
                    cells.append(f"<td{cls}{span}>{_e(value)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        i = j + 1
    return (f'<div class="table-wrap"><table id="{_e(table_id)}"><thead>{_header_rows(head)}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _stats(region: RegionReport | None, dist: DistortionReport | None) -> list[tuple[str, str]]:
    """The headline numbers of a run's card: accuracy, median l2 margin, median worst-case distortion."""
    out: list[tuple[str, str]] = []
    if region is not None:
        out.append(("accuracy", f"{region.accuracy:.1%}"))
        units = "pixel" if "pixel" in region.margins else region.model_units
        p50 = region.margins.get(units, {}).get("l2", {}).get("P50", math.nan)
        out.append((f"median l2 margin ({units})", f"{p50:.3g}"))
    if dist is not None:
        out.append(("median worst-case distortion", f"{dist.worst['P50']:.3g}"))
    return out


def _card(run: RunSummary, colour: str, stats: Sequence[tuple[str, str]] = ()) -> str:
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in run.facts)
    tiles = "".join(f'<div class="stat"><span class="value">{_e(v)}</span><span class="label">{_e(k)}</span></div>'
                    for k, v in stats)
    config = json.dumps(run.config, indent=1)
    return (f'<section class="card run" style="--run: {colour}" data-run="{_e(run.name)}">'
            f'<h3>{_e(run.name)}</h3><p class="path">{_e(run.manifest)}</p>'
            + (f'<div class="stats">{tiles}</div>' if tiles else "")
            + f"<dl>{facts}</dl>"
            f"<details><summary>full config</summary><pre>{_e(config)}</pre></details></section>")


def _figure(fig: Figure) -> str:
    wide = ' class="wide"' if fig.wide else ""
    if fig.png is None:
        inner = f'<p class="note">Not drawn: {_e(fig.note)}</p>'
    else:
        data = base64.b64encode(fig.png).decode("ascii")
        inner = f'<img alt="{_e(fig.title)}" src="data:image/png;base64,{data}">'
    return f"<figure{wide}><h3>{_e(fig.title)}</h3>{inner}<figcaption>{_e(fig.caption)}</figcaption></figure>"


def render_html(report: Report) -> str:
    """The page of ``report``: one HTML document, styles inline, pictures as data URIs.

    Example:
        >>> from rollnet.train.evaluation import RegionReport, NORMS
        >>> q = {"P25": 1.0, "P50": 2.0, "P75": 3.0, "P100": 4.0}
        >>> r = RegionReport("vanilla", "test", 2, 0.5, 2, 2, "raw", {"raw": 1.0},
        ...                  {"raw": {k: q for k in NORMS}}, "float64", 0.1)
        >>> page = render_html(Report([RunSummary("vanilla", Path("runs/v/best.json"), [], {})], [r], None))
        >>> page.startswith("<!DOCTYPE html>"), "vanilla" in page, "<table" in page
        (True, True, True)
    """
    colours = {run.name: _TAB10[i % len(_TAB10)] for i, run in enumerate(report.runs)}
    regions = {r.model: r for r in report.regions}
    dists = {d.model: d for d in report.distortions or []}
    names = ", ".join(run.name for run in report.runs)
    meta = [f"{len(report.runs)} run{'s' if len(report.runs) != 1 else ''}: {_e(names)}",
            f"{_e(report.split)} split"]
    if report.generated:
        meta.append(f"generated {_e(report.generated)}")
    try:
        from rollnet import __version__
        meta.append(f"rollnet {_e(__version__)}")
    except ImportError:  # pragma: no cover
        pass
    command = f'<p class="meta">command: <code>{_e(report.command)}</code></p>' if report.command else ""
    toc = ['<a href="#runs">Runs</a>', '<a href="#regions">Regions and margins</a>']
    sections = [
        '<section id="runs"><h2>Runs</h2><div class="cards">'
        + "".join(_card(run, colours[run.name], _stats(regions.get(run.name), dists.get(run.name)))
                  for run in report.runs) + "</div></section>",
    ]
    head, rows = table_rows(report.regions)
    sequence = bool(report.regions) and all(r.sequence for r in report.regions)
    layout = "the paper's Table-2 layout" if sequence else "the paper's Table-1 layout"
    sections.append(
        f'<section id="regions"><h2>Linear regions and margins</h2><p class="lead">{_e(describe(report.regions))} '
        f"Margins: percentiles over examples of the certified radius around each example inside which the network "
        f"is linear ({layout}).</p>"
        + _table(head, rows, colours, table_id="regions-table", merge=1 if sequence else 4) + "</section>")
    if report.distortions is not None:
        toc.append('<a href="#distortion">Gradient distortion</a>')
        head, rows = distortion_rows(report.distortions)
        sections.append(
            f'<section id="distortion"><h2>Gradient distortion</h2><p class="lead">'
            f"{_e(describe_distortion(report.distortions))}</p>"
            + _table(head, rows, colours, table_id="distortion-table") + "</section>")
    if report.figures:
        toc.append('<a href="#figures">Pictures</a>')
        sections.append('<section id="figures"><h2>Pictures</h2><div class="figures">'
                        + "".join(_figure(f) for f in report.figures) + "</div></section>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(report.title)}: {_e(names)}</title>
<style>{_CSS}</style>
</head>
<body>
<header class="top"><div class="wrap">
<h1>{_e(report.title)}</h1>
<p class="meta">{" · ".join(meta)}</p>
{command}
<nav class="toc">{"".join(toc)}</nav>
</div></header>
<main class="wrap">
{"".join(sections)}
</main>
<footer class="wrap">Made by <code>rollnet report</code>. Self-contained: styles inline, pictures embedded;
this page loads nothing from the network. Certified margins are exact (float64) radii of the linear region
around each example; see the rollnet documentation (docs/evaluation.md) for the definitions.</footer>
</body>
</html>
"""


def write_report(paths: Sequence[str | Path], output: str | Path, **options: Any) -> Path:
    """Build the report of ``paths`` (:func:`build_report`, same options) and write it to ``output``.

    Args:
        paths: run directories or manifests.
        output: the HTML file to write (its folder is created).
        **options: passed to :func:`build_report`.

    Returns:
        The path written.

    Example:
        >>> import tempfile, pathlib
        >>> from rollnet.train import TrainConfig, apply_overrides, train
        >>> cfg = apply_overrides(TrainConfig(), ["data.name=moons", "data.n=200", "model.hidden=[8]",
        ...                                       "epochs=1", "progress=false", "val_margin_samples=0"])
        >>> run = tempfile.mkdtemp()
        >>> _ = train(cfg, run, log=lambda m: None)
        >>> out = write_report([run], pathlib.Path(run) / "report.html", figures=False)
        >>> "Linear regions and margins" in out.read_text()
        True
    """
    report = build_report(paths, **options)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report), encoding="utf-8")
    return out
