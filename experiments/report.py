"""`cxr report`: one self-contained HTML page (plotly, opens offline) for the workspace or an experiment.

Per-label test AUROC (with its patient-bootstrap interval) and AUPRC beside CheXNet's figures,
ROC curves, reliability curves (calibration), training curves, the confusion matrix, the split's
patient-leak count, and where the model looks (the localize stage's table beside a random map's and Wang
et al.'s figures, and its gallery of heatmap overlays). Everything is read through DVC (dvc.api) for an
experiment, or from the workspace files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import plotly.graph_objects as go

from cxr14 import labels, localize
from cxr14.atomic import atomic_path
from cxr14.params import apply, flatten
from experiments import tables

EVALUATE_PLOTS = "plots/evaluate/plots"
TRAIN_PLOTS = "metrics/train/plots/metrics"
LOCALIZE_GALLERY = "plots/localize"


def read(path: str, rev: str | None) -> str | None:
    try:
        if rev is None:
            return Path(path).read_text()
        import dvc.api

        return dvc.api.read(path, rev=rev)
    except Exception:  # a file that this run did not write (e.g. no training curves yet)
        return None


def read_bytes(path: str, rev: str | None) -> bytes | None:
    try:
        if rev is None:
            return Path(path).read_bytes()
        import dvc.api

        return dvc.api.read(path, rev=rev, mode="rb")
    except Exception:  # a file that this run did not write
        return None


def read_json(path: str, rev: str | None):
    text = read(path, rev)
    return json.loads(text) if text else None


def chexnet_auroc() -> dict[str, float]:
    reference = next(c for c in tables.load()["final_vs_chexnet"].columns if c.reference)
    return dict(zip(labels.FINDINGS, reference.report["auroc"]))


def auroc_figure(result: dict) -> go.Figure:
    names = [n for n, v in result["auroc"].items() if v is not None]
    ci = result.get("auroc_ci") or {}
    low = [result["auroc"][n] - ci[n][0] if ci.get(n) else 0 for n in names]
    high = [ci[n][1] - result["auroc"][n] if ci.get(n) else 0 for n in names]
    fig = go.Figure()
    fig.add_bar(x=names, y=[result["auroc"][n] for n in names], name="AUROC (95% CI, by patient)",
                error_y={"type": "data", "array": high, "arrayminus": low})
    fig.add_bar(x=names, y=[(result.get("auprc") or {}).get(n) for n in names], name="AUPRC")
    chexnet = chexnet_auroc()
    fig.add_scatter(x=names, y=[chexnet.get(n) for n in names], mode="markers", name="CheXNet (paper)",
                    marker={"symbol": "star", "size": 12, "color": "black"})
    fig.update_layout(title="Test AUROC and AUPRC by label", barmode="group", yaxis_range=[0, 1.05],
                      template="plotly_white", legend={"orientation": "h", "y": -0.25})
    return fig


def roc_figure(result: dict, rev: str | None) -> go.Figure:
    fig = go.Figure()
    for name, value in result["auroc"].items():
        points = read_json(f"{EVALUATE_PLOTS}/sklearn/roc/{name}.json", rev)
        if points and value is not None:
            rows = points["roc"]
            fig.add_scatter(x=[r["fpr"] for r in rows], y=[r["tpr"] for r in rows], mode="lines",
                            name=f"{name} ({value:.3f})")
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "gray"}, name="chance")
    fig.update_layout(title="ROC curves (test)", xaxis_title="false positive rate", yaxis_title="true positive rate",
                      template="plotly_white", height=600)
    return fig


def _tsv(path: str, rev: str | None) -> list[dict]:
    text = read(path, rev)
    return list(csv.DictReader(io.StringIO(text), delimiter="\t")) if text else []


def training_figure(rev: str | None) -> go.Figure:
    fig = go.Figure()
    for name, axis in (("train_loss", "y"), ("val_loss", "y"), ("auroc_macro", "y2")):
        rows = _tsv(f"{TRAIN_PLOTS}/{name}.tsv", rev)
        fig.add_scatter(x=[int(r["step"]) + 1 for r in rows], y=[float(r[name]) for r in rows], name=name,
                        yaxis=axis, mode="lines+markers")
    fig.update_layout(title="Training curves", xaxis_title="epoch", yaxis_title="loss",
                      yaxis2={"title": "validation macro AUROC", "overlaying": "y", "side": "right"},
                      template="plotly_white")
    return fig


def reliability_figure(result: dict, rev: str | None) -> go.Figure | None:
    """Observed frequency against mean predicted probability, one line per label (the evaluate stage's bins)."""
    data = read_json(f"{EVALUATE_PLOTS}/custom/calibration.json", rev)
    if not data:
        return None
    rows = data["calibration"] if isinstance(data, dict) else data
    ece = result.get("ece") or {}
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "gray"}, name="perfectly calibrated")
    for name in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == name]
        error = f" (ECE {ece[name]:.3f})" if ece.get(name) is not None else ""
        fig.add_scatter(x=[r["mean_predicted"] for r in mine], y=[r["observed"] for r in mine], mode="lines+markers",
                        name=name + error, customdata=[r["images"] for r in mine],
                        hovertemplate="predicted %{x:.3f}, observed %{y:.3f}, %{customdata} images")
    macro = f", macro ECE {result['ece_macro']:.3f}" if result.get("ece_macro") is not None else ""
    fig.update_layout(title=f"Reliability (test{macro})", xaxis_title="mean predicted probability",
                      yaxis_title="observed frequency", xaxis_range=[0, 1], yaxis_range=[0, 1], template="plotly_white",
                      height=600)
    return fig


def confusion_figure(rev: str | None) -> go.Figure | None:
    data = read_json(f"{EVALUATE_PLOTS}/sklearn/confusion_matrix.json", rev)
    if not data:
        return None
    pairs = data["confusion_matrix"] if isinstance(data, dict) else data  # dvclive writes a bare list
    names = sorted({p["actual"] for p in pairs} | {p["predicted"] for p in pairs})
    counts = [[0] * len(names) for _ in names]
    for p in pairs:
        counts[names.index(p["actual"])][names.index(p["predicted"])] += 1
    fig = go.Figure(go.Heatmap(z=counts, x=names, y=names, colorscale="Blues", text=counts, texttemplate="%{text}"))
    fig.update_layout(title="Confusion matrix: true label against top predicted label", xaxis_title="predicted",
                      yaxis_title="true", yaxis_autorange="reversed", height=650, template="plotly_white")
    return fig


def localize_figure(result: dict | None, findings: list[str]) -> go.Figure | None:
    """Accuracy at T(IoBB) = 0.1 and the pointing game by finding: ours, the random map's, Wang et al.'s."""
    model = (result or {}).get("model") or {}
    names = [f for f in findings if f in (model.get("boxes") or {})]
    if not names:
        return None
    at, chance = "0.1", result["random"]
    fig = go.Figure()
    fig.add_bar(x=names, y=[model["accuracy_iobb"].get(at, {}).get(n) for n in names], name="IoBB > 0.1: ours")
    fig.add_bar(x=names, y=[chance["accuracy_iobb"].get(at, {}).get(n) for n in names], name="IoBB > 0.1: random map")
    fig.add_scatter(x=names, y=[result["wang_2017"]["iobb"][at].get(n) for n in names], mode="markers",
                    name="IoBB > 0.1: Wang et al. 2017 (NIH)", marker={"symbol": "star", "size": 12, "color": "black"})
    fig.add_bar(x=names, y=[model["pointing"].get(n) for n in names], name="pointing: ours")
    fig.add_bar(x=names, y=[chance["pointing"].get(n) for n in names], name="pointing: random map")
    fig.update_layout(title="Localization by finding: accuracy at T(IoBB) = 0.1 and the pointing game",
                      barmode="group", yaxis_range=[0, 1.05], template="plotly_white",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def localize_html(rev: str | None, params: dict | None) -> str:
    """The localize stage's table and gallery (overlays embedded as PNG data), or a line saying why there is none."""
    result = read_json("metrics/localize.json", rev)
    if not result:
        return ""
    findings = ((params or {}).get("localize") or {}).get("findings") or list(localize.WANG_2017["iobb"]["0.1"])
    out = ["<h2>Where the model looks</h2>"]
    if ((params or {}).get("data") or {}).get("source") == "synthetic":
        out.append("<p class='warn'>Measured on the synthetic data set against the synthetic signs' boxes; "
                   "Wang et al.'s figures are NIH's (ResNet-50 heatmaps on NIH's 984 radiologist boxes).</p>")
    if not result.get("boxes_scored"):
        return "".join(out) + f"<p>{html.escape(result.get('note') or 'nothing scored')}</p>"
    header, *rows = localize.table_rows(result, findings)
    out.append(f"<p>{html.escape(result['method'])} heatmaps of {result['boxes_scored']} boxes on "
               f"{result['images_scored']} test images ({result['test_images_without_boxes']} test images without "
               "boxes skipped): the share of true boxes whose best heatmap box has IoBB (or IoU) above T, and the "
               "share of images whose heatmap peaks inside a true box (pointing), each beside a seeded random map's.</p>")
    out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
               + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
               + "</table>")
    figure = localize_figure(result, findings)
    if figure:  # plotly.js is already on the page (the AUROC figure carries it)
        out.append(figure.to_html(full_html=False, include_plotlyjs=False))
    gallery = read_json(f"{LOCALIZE_GALLERY}/gallery.json", rev) or {"images": []}
    figures = []
    for entry in gallery["images"]:
        data = read_bytes(f"{LOCALIZE_GALLERY}/{entry['file']}", rev)
        if data:
            caption = (f"{entry['finding']}, {entry['kind']}: {entry['image']}, IoU {entry['iou']:.2f}, "
                       f"IoBB {entry['iobb']:.2f}, pointing {'hit' if entry['pointing'] else 'miss'}")
            figures.append(f"<figure><img src='data:image/png;base64,{base64.b64encode(data).decode()}' "
                           f"alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    if figures:
        out.append("<p>Gallery (best, typical and worst by IoU): true boxes green, the heatmap's boxes red, where it "
                   f"points a white cross.</p><div class='gallery'>{''.join(figures)}</div>")
    return "".join(out)


def summary_html(result: dict, split: dict | None, params: dict | None) -> str:
    source = ((params or {}).get("data") or {}).get("source", "?")
    ci = result.get("auroc_macro_ci")
    rows = [("test images", result.get("images")),
            ("macro AUROC", f"{result['auroc_macro']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")),
            ("micro AUROC", f"{result['auroc_micro']:.3f}" if result.get("auroc_micro") is not None else "-"),
            ("macro AUPRC", f"{result['auprc_macro']:.3f}" if result.get("auprc_macro") is not None else "-"),
            ("test loss", f"{result['loss']:.4f}")]
    if split:
        rows += [(f"{part} images / patients", f"{split[part]['images']:,} / {split[part]['patients']:,}")
                 for part in ("train", "val", "test")]
        rows.append(("patients in more than one part", split["patients_in_more_than_one_part"]))
    if params:
        rows += [("data source", source), ("task", params.get("task", {}).get("kind")),
                 ("backbone", params.get("model", {}).get("backbone"))]
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    warning = ("<p class='warn'>Measured on the synthetic data set: these figures test the pipeline and say "
               "nothing about NIH ChestX-ray14.</p>") if source == "synthetic" else ""
    return f"{warning}<table>{cells}</table>"


def run_params(rev: str | None) -> dict:
    """The params the results were made with: an experiment's params.yaml, or the workspace's dvc.lock
    (the workspace params.yaml may have changed since the last run)."""
    import yaml

    if rev is not None:
        import dvc.api

        return dvc.api.params_show(rev=rev)
    lock = Path("dvc.lock")
    merged: dict = {}
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()).get("stages") or {}).values():
            for values in (stage.get("params") or {}).values():
                merged = apply(merged, flatten(values))
    return merged


def write(rev: str | None = None, out: str | Path = "plots/report.html") -> Path:
    result = read_json("metrics/evaluate.json", rev)
    if not result:
        where = f"experiment {rev}" if rev else "the workspace"
        raise FileNotFoundError(f"no metrics/evaluate.json in {where}: run the pipeline (dvc repro) first")
    split = read_json("metrics/split.json", rev)
    params = run_params(rev)
    figures = [auroc_figure(result), roc_figure(result, rev), reliability_figure(result, rev), training_figure(rev),
               confusion_figure(rev)]
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(f for f in figures if f)]
    title = f"cxr14 report: {html.escape(rev or 'workspace')}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}
table{{border-collapse:collapse}} th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
.warn{{background:#fff3cd;padding:.6em;border:1px solid #e0c36a}}
.gallery{{display:flex;flex-wrap:wrap;gap:8px}} figure{{margin:0;width:260px;font-size:12px}}</style>
</head><body><h1>{title}</h1>{summary_html(result, split, params)}{''.join(parts)}{localize_html(rev, params)}</body></html>"""
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
