"""`cxr report`: one self-contained HTML page (plotly, opens offline) for the workspace or an experiment.

Per-label test AUROC (with its patient-bootstrap interval) and AUPRC beside CheXNet's figures,
ROC curves, training curves, the confusion matrix, and the split's patient-leak count. Everything is
read through DVC (dvc.api) for an experiment, or from the workspace files.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import plotly.graph_objects as go

from cxr14 import labels as L
from cxr14 import params as P
from cxr14.atomic import atomic_path
from experiments import tables

EVALUATE_PLOTS = "plots/evaluate/plots"
TRAIN_PLOTS = "metrics/train/plots/metrics"


def read(path: str, rev: str | None) -> str | None:
    try:
        if rev is None:
            return Path(path).read_text()
        import dvc.api

        return dvc.api.read(path, rev=rev)
    except Exception:  # a file that this run did not write (e.g. no training curves yet)
        return None


def read_json(path: str, rev: str | None):
    text = read(path, rev)
    return json.loads(text) if text else None


def chexnet_auroc() -> dict[str, float]:
    reference = next(c for c in tables.load()["final_vs_chexnet"].columns if c.reference)
    return dict(zip(L.FINDINGS, reference.report["auroc"]))


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
                merged = P.apply(merged, P.flatten(values))
    return merged


def write(rev: str | None = None, out: str | Path = "plots/report.html") -> Path:
    result = read_json("metrics/evaluate.json", rev)
    if not result:
        where = f"experiment {rev}" if rev else "the workspace"
        raise FileNotFoundError(f"no metrics/evaluate.json in {where}: run the pipeline (dvc repro) first")
    split = read_json("metrics/split.json", rev)
    params = run_params(rev)
    figures = [auroc_figure(result), roc_figure(result, rev), training_figure(rev), confusion_figure(rev)]
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(f for f in figures if f)]
    title = f"cxr14 report: {html.escape(rev or 'workspace')}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}
table{{border-collapse:collapse}} th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
.warn{{background:#fff3cd;padding:.6em;border:1px solid #e0c36a}}</style>
</head><body><h1>{title}</h1>{summary_html(result, split, params)}{''.join(parts)}</body></html>"""
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
