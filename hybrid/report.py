"""The report stage: one self-contained HTML page from the result files of a run.

It reads only what the stages wrote (manifest and shards for a few example images, losses.csv,
the generated manifest and contact sheets, evaluate.json, classify.json, the skip lists) and
recomputes nothing; every image is embedded as a base64 PNG, the page loads no external assets.
Each figure and table says which weights produced it, and every skipped record is listed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from hybrid.data.shards import ShardDataset
from hybrid.io import write_text_atomic
from hybrid.viz import contact_sheet

log = logging.getLogger(__name__)

STAND_IN_MARK = "random stand-in"
SHEET_IMAGES = 4  # example images per (split, label) group on the dataset sheet
TABLE6_METRICS = {"major_recall": "SignalHybrid", "minor_recall": "Non-SignalH", "mimic_recall": "MimicHybrid",
                  "challenge_score": "HMean"}

CSS = """
:root { --ink:#1d2330; --muted:#5b6474; --line:#dde2ea; --card:#fff; --bg:#f4f6f9; --accent:#2f5d8a; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
header { background:#1f2a3a; color:#fff; padding:28px 0 22px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:650; letter-spacing:.2px; }
header p { margin:0; color:#c9d3e0; }
.wrap { max-width:1120px; margin:0 auto; padding:0 24px; }
nav { margin-top:14px; display:flex; flex-wrap:wrap; gap:6px; }
nav a { color:#dfe7f1; text-decoration:none; font-size:13px; padding:3px 10px; border:1px solid #4a5b73;
        border-radius:999px; }
nav a:hover { background:#34465f; }
main { padding:22px 0 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 22px 20px;
          margin:0 0 18px; }
h2 { margin:0 0 10px; font-size:19px; color:var(--accent); }
h3 { margin:18px 0 8px; font-size:15px; }
p.note, .caption { color:var(--muted); font-size:13px; margin:6px 0 10px; }
.stats { display:flex; flex-wrap:wrap; gap:10px; margin:4px 0 0; }
.stat { border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:130px; background:#fafbfd; }
.stat b { display:block; font-size:20px; }
.stat span { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.5px; }
figure { margin:10px 0 6px; }
figure img { max-width:100%; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
table { border-collapse:collapse; margin:6px 0 10px; font-size:13.5px; font-variant-numeric:tabular-nums; }
th, td { border-bottom:1px solid var(--line); padding:5px 12px; text-align:left; vertical-align:top; }
th { background:#eef2f7; font-weight:600; }
td.num, th.num { text-align:right; }
tbody tr:hover { background:#f7f9fc; }
.scroll { max-height:320px; overflow:auto; border:1px solid var(--line); border-radius:6px; }
.scroll table { margin:0; width:100%; }
.badge { display:inline-block; font-size:12px; padding:1px 9px; border-radius:999px; margin:2px 4px 2px 0;
         border:1px solid; }
.badge.real { color:#1d6b3a; background:#e8f6ee; border-color:#a9dbbd; }
.badge.stand-in { color:#8a5300; background:#fff4e0; border-color:#f0cf96; }
.empty { color:var(--muted); font-style:italic; }
pre { background:#f6f8fb; border:1px solid var(--line); border-radius:6px; padding:10px 14px; overflow:auto;
      font-size:12.5px; line-height:1.45; max-height:480px; }
details summary { cursor:pointer; color:var(--accent); font-size:13.5px; margin:6px 0; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 30px; }
"""


# ----------------------------------------------------------------------------- small builders


def esc(x: object) -> str:
    return html.escape("" if x is None else str(x))


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def rgb_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode a PNG for the report")
    return buf.tobytes()


def figure(data: bytes, caption: str, alt: str) -> str:
    return (f'<figure><img alt="{esc(alt)}" src="{png_uri(data)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def badge(label: str) -> str:
    cls = "stand-in" if STAND_IN_MARK in label else "real"
    return f'<span class="badge {cls}">{esc(label)}</span>'


def table(df: pd.DataFrame, num: tuple[str, ...] = (), index: bool = False) -> str:
    """An escaped HTML table; columns in ``num`` are right-aligned."""
    if index:
        df = df.reset_index()
    head = "".join(f'<th class="{"num" if c in num else ""}">{esc(c)}</th>' for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = "".join(f'<td class="{"num" if c in num else ""}">{esc("–" if _missing(v) else v)}</td>'
                        for c, v in zip(df.columns, row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _missing(v: object) -> bool:
    return v is None or (not isinstance(v, str) and bool(pd.isna(v)))


def _fmt(v: object, digits: int = 3) -> str:
    return "–" if _missing(v) else f"{float(v):.{digits}f}"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>'


def empty(text: str) -> str:
    return f'<p class="empty">{esc(text)}</p>'


# ----------------------------------------------------------------------------- sections


def dataset_section(manifest: pd.DataFrame | None, shard_index: Path | None, seed: int = 0) -> str:
    if manifest is None:
        return section("dataset", "Dataset", empty("No manifest was given."))
    counts = (manifest.assign(label=manifest["label"].map({0: "normal", 1: "anomaly / hybrid"}))
              .groupby(["category", "split", "label"]).size().unstack("label", fill_value=0)
              .reindex(columns=["normal", "anomaly / hybrid"], fill_value=0).reset_index())
    body = [f'<p class="note">{len(manifest)} images in results/manifest.parquet.</p>']
    if shard_index is not None and Path(shard_index).exists():
        index = pd.read_parquet(shard_index)
        rows = manifest.merge(index, on="sample_id")
        rng = np.random.default_rng(seed)
        picks = []
        for _, g in rows.groupby(["split", "label"], sort=True):
            picks.append(g.iloc[np.sort(rng.choice(len(g), size=min(SHEET_IMAGES, len(g)), replace=False))])
        if picks:
            pick = pd.concat(picks).reset_index(drop=True)
            ds = ShardDataset(pick[["sample_id", "shard", "index"]], fields=("image",),
                              shard_dir=Path(shard_index).parent, raw=True)
            try:
                images = [ds[i]["image"] for i in range(len(ds))]
            finally:
                ds.close()
            labels = [f"{r.split} {_kind(r)}" for r in pick.itertuples()]
            sheet = contact_sheet(images, labels, cols=min(8, len(images)), cell=128)
            body.append(figure(rgb_png(sheet), f"Examples from the shards at the working resolution "
                                               f"({images[0].shape[1]}x{images[0].shape[0]}), up to "
                                               f"{SHEET_IMAGES} per split and label.", "dataset examples"))
    body.append(table(counts, num=("normal", "anomaly / hybrid")))
    return section("dataset", "Dataset", "".join(body))


def _kind(r: object) -> str:
    for col in ("hybrid_type", "defect"):
        v = getattr(r, col, None)
        if not _missing(v) and v != "good":
            return str(v)
    return "anomaly" if int(getattr(r, "label")) else "normal"


def training_section(losses_csv: Path | None) -> str:
    if losses_csv is None or not Path(losses_csv).exists():
        return section("training", "Training", empty("No training losses (results/train/losses.csv) were given."))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_csv(losses_csv)
    if df.empty:
        return section("training", "Training", empty(f"{losses_csv} has no rows."))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), dpi=110)
    for ax, cols, title in ((axes[0], ["G_total", "D_total"], "total losses"),
                            (axes[1], ["G_gan", "G_feat", "G_vgg", "G_mask", "D_real", "D_fake"], "terms")):
        for c in cols:
            if c in df and df[c].abs().sum() > 0:
                ax.plot(df["step"], df[c], lw=1.2, label=c)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    last = df.iloc[-1]
    stats = (f'<div class="stats"><div class="stat"><span>steps</span><b>{int(last["step"])}</b></div>'
             f'<div class="stat"><span>epochs</span><b>{int(last["epoch"]) + 1 if "epoch" in df else "–"}</b></div>'
             f'<div class="stat"><span>last G loss</span><b>{_fmt(last.get("G_total"))}</b></div>'
             f'<div class="stat"><span>last D loss</span><b>{_fmt(last.get("D_total"))}</b></div></div>')
    return section("training", "Training", stats + figure(
        buf.getvalue(), "Generator (G) and discriminator (D) losses per step, from results/train/losses.csv.",
        "training losses"))


def generated_section(generated_manifest: Path | None) -> str:
    if generated_manifest is None or not Path(generated_manifest).exists():
        return section("generated", "Generated images", empty("No generated manifest was given."))
    gen = pd.read_parquet(generated_manifest)
    counts = gen.groupby(["category", "kind", "decoder"]).size().unstack("decoder", fill_value=0).reset_index()
    body = [f'<p class="note">{len(gen)} generated images (results/generated/manifest.parquet); each pair gives '
            "one image per decoder.</p>", table(counts, num=tuple(c for c in counts.columns if c not in
                                                                  ("category", "kind")))]
    sheets = sorted((Path(generated_manifest).parent / "sheets").glob("*.png"))
    if not sheets:
        body.append(empty("No contact sheets in results/generated/sheets/."))
    for p in sheets:
        body.append(f"<h3>{esc(p.stem)}</h3>" + figure(p.read_bytes(), f"Contact sheet {esc(p.name)}: references, "
                                                          "targets, and each decoder's image and fusion mask M.",
                                                          f"generated {p.stem}"))
    return section("generated", "Generated images", "".join(body))


def evaluation_section(ev: Mapping | None) -> str:
    if ev is None:
        return section("generation-quality", "Generation quality", empty("The evaluate stage was not run."))
    rows = pd.DataFrame(ev["rows"])
    w = ev.get("weights", {})
    body = [f'<p class="caption">Inception Score weights: {badge(w.get("inception_score", "?"))}<br>'
            f'Cluster LPIPS ({esc(ev.get("lpips_net", "?"))}) weights: {badge(w.get("lpips", "?"))}</p>']
    if rows.empty:
        return section("generation-quality", "Generation quality", "".join(body) + empty("No rows."))
    cells = rows.assign(cell=[f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(rows["is_mean"], rows["lpips"])])
    pivot = cells.pivot(index="category", columns="decoder", values="cell")
    order = [c for c in ("AHD", "AHE", "both") if c in pivot.columns] + \
        [c for c in pivot.columns if c not in ("AHD", "AHE", "both")]
    cats = [c for c in pivot.index if c != "(mean)"] + [c for c in pivot.index if c == "(mean)"]
    pivot = pivot.loc[cats, order].fillna("–")
    body.append('<p class="note">IS&thinsp;↑ / cluster LPIPS&thinsp;↑ per category and decoder (the layout of '
                f'paper 003 Tables 1 and 5); kinds scored: {esc(", ".join(ev.get("kinds", [])))}.</p>')
    body.append(table(pivot, num=tuple(order), index=True))
    detail = rows.assign(IS=[f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(rows["is_mean"], rows["is_std"])],
                         LPIPS=[f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(rows["lpips"], rows["lpips_std"])])
    detail = detail[["category", "decoder", "n_images", "IS", "is_splits", "LPIPS", "n_centres", "n_clusters_used",
                     "note"]]
    body.append("<details><summary>All numbers (mean ± std over IS splits / over clusters)</summary>"
                + table(detail, num=("n_images", "IS", "is_splits", "LPIPS", "n_centres", "n_clusters_used"))
                + "</details>")
    return section("generation-quality", "Generation quality", "".join(body))


def table6(rows: pd.DataFrame) -> pd.DataFrame:
    """Paper 003 Table 6's layout: recalls and harmonic mean x training sets, heads joined by "/"."""
    heads = list(dict.fromkeys(rows["head"]))
    out = {}
    for ts in dict.fromkeys(rows["train_set"]):
        part = rows[rows["train_set"] == ts].set_index("head")
        out[ts] = [" / ".join(_fmt(part.loc[h, m]) if h in part.index else "–" for h in heads)
                   for m in TABLE6_METRICS]
    return pd.DataFrame(out, index=pd.Index(list(TABLE6_METRICS.values()), name="Recall@"))


def classification_section(cl: Mapping | None, why_absent: str) -> str:
    if cl is None:
        return section("classification", "Hybrid classification", empty(why_absent))
    rows = pd.DataFrame(cl["rows"])
    heads = " / ".join(dict.fromkeys(rows["head"])) if not rows.empty else ""
    counts = cl.get("counts", {})
    body = [f'<p class="caption">DINOv2 features (configured model {esc(cl.get("model"))}; '
            f'{esc(cl.get("feature_dim"))}-d features) weights: {badge(cl.get("weights", "?"))}</p>',
            '<div class="stats">' + "".join(f'<div class="stat"><span>{esc(k.replace("_", " "))}</span>'
                                            f"<b>{esc(v)}</b></div>" for k, v in counts.items()) + "</div>",
            f'<p class="note">Recall of hybrids at 95% non-hybrid recall (HDR challenge rule) against '
            f'{esc(Path(str(cl.get("reference_csv"))).name)}; HMean = challenge score. Cells: {esc(heads)}, '
            "as in paper 003 Table 6.</p>"]
    if rows.empty:
        return section("classification", "Hybrid classification", "".join(body) + empty("No rows."))
    t6 = table6(rows)
    body.append(table(t6, num=tuple(t6.columns), index=True))
    long = rows[["head", "train_set", "n_train", "n_generated", *TABLE6_METRICS]].copy()
    for c in TABLE6_METRICS:
        long[c] = long[c].map(_fmt)
    body.append("<details><summary>One row per head and training set</summary>"
                + table(long, num=("n_train", "n_generated", *TABLE6_METRICS)) + "</details>")
    return section("classification", "Hybrid classification", "".join(body))


def skip_lists(ingest_skipped: Path | None, shard_index: Path | None, ev: Mapping | None,
               cl: Mapping | None) -> list[tuple[str, pd.DataFrame, bool]]:
    """(title, table, is a skip) of every record a stage left out; ``False`` marks what the config
    leaves out on purpose (generated kinds not scored)."""
    lists = []
    if ingest_skipped is not None and Path(ingest_skipped).exists():
        lists.append(("Ingest (results/ingest_skipped.csv)", pd.read_csv(ingest_skipped), True))
    pre = Path(shard_index).parent / "skipped.parquet" if shard_index is not None else None
    if pre is not None and pre.exists():
        lists.append(("Preprocess (results/shards/skipped.parquet)", pd.read_parquet(pre), True))
    if ev is not None:
        lists.append(("Evaluate: not scored", pd.DataFrame(ev.get("skipped", []),
                                                           columns=["category", "decoder", "metric", "reason"]), True))
        left = ev.get("kinds_left_out") or {}
        if left:
            lists.append(("Evaluate: generated kinds left out by evaluate.kinds",
                          pd.DataFrame({"kind": list(left), "images": list(left.values())}), False))
    if cl is not None:
        lists.append(("Classify: left out", pd.DataFrame(cl.get("skipped", []), columns=["what", "id", "reason"]),
                      True))
    return lists


def skipped_section(lists: list[tuple[str, pd.DataFrame, bool]]) -> str:
    if not lists:
        return section("skipped", "Skipped records", empty("No skip lists were given."))
    overview = pd.DataFrame({"list": [t for t, _, _ in lists], "records": [len(df) for _, df, _ in lists]})
    body = ['<p class="note">Every record a stage left out, and why: nothing is dropped silently.</p>',
            table(overview, num=("records",))]
    for title, df, _ in lists:
        if len(df):
            body.append(f'<h3>{esc(title)}: {len(df)}</h3><div class="scroll">{table(df)}</div>')
    return section("skipped", "Skipped records", "".join(body))


def summary_section(man: pd.DataFrame | None, generated_manifest: Path | None, ev: Mapping | None,
                    cl: Mapping | None, lists: list[tuple[str, pd.DataFrame, bool]]) -> str:
    """Headline numbers; the sections below say how each was made."""
    stats = []
    if man is not None:
        stats.append(("real images", len(man)))
    if generated_manifest is not None and Path(generated_manifest).exists():
        stats.append(("generated images", len(pd.read_parquet(generated_manifest, columns=["sample_id"]))))
    if ev is not None and ev.get("rows"):
        rows = pd.DataFrame(ev["rows"])
        mean = rows[rows["category"] == "(mean)"]
        pick = mean[mean["decoder"] == "both"] if (mean["decoder"] == "both").any() else mean
        if len(pick):
            r = pick.iloc[0]
            stats += [(f"IS, mean ({r['decoder']})", _fmt(r["is_mean"])),
                      (f"cluster LPIPS, mean ({r['decoder']})", _fmt(r["lpips"]))]
    if cl is not None and cl.get("rows"):
        rows = pd.DataFrame(cl["rows"])
        best = rows.loc[rows["challenge_score"].idxmax()]
        base = rows[rows["train_set"] == "train"]["challenge_score"].max()
        stats += [("challenge score, train only", _fmt(base)),
                  (f"best challenge score ({best['head']}, {best['train_set']})", _fmt(best["challenge_score"]))]
    stats.append(("skipped records", sum(len(df) for _, df, skip in lists if skip)))
    boxes = "".join(f'<div class="stat"><span>{esc(k)}</span><b>{esc(v)}</b></div>' for k, v in stats)
    return section("summary", "At a glance", f'<div class="stats">{boxes}</div>')


def config_section(config: Mapping | None) -> str:
    if not config:
        return section("config", "Configuration", empty("No configuration was given."))
    text = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)
    return section("config", "Configuration",
                   f'<p class="note">The configuration of this run.</p><pre>{esc(text)}</pre>')


# ----------------------------------------------------------------------------- the page


def _read_json(path: str | Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path is not None and Path(path).exists() else None


def build_report(
    out_html: str | Path,
    *,
    config: Mapping | None = None,
    manifest: str | Path | None = None,
    shard_index: str | Path | None = None,
    ingest_skipped: str | Path | None = None,
    losses_csv: str | Path | None = None,
    generated_manifest: str | Path | None = None,
    evaluate_json: str | Path | None = None,
    classify_json: str | Path | None = None,
    classify_absent: str = "The classify stage is not part of this run (it needs a butterfly dataset with a "
                           "reference CSV).",
) -> Path:
    """Write the report page to ``out_html`` and return its path. Any input may be None (its section
    says so); ``results/shards/skipped.parquet`` and ``results/generated/sheets/`` are found beside
    the shard index and the generated manifest."""
    man = pd.read_parquet(manifest) if manifest is not None else None
    ev, cl = _read_json(evaluate_json), _read_json(classify_json)
    layout = (config or {}).get("dataset", {}).get("layout", "?")
    lists = skip_lists(Path(ingest_skipped) if ingest_skipped else None,
                       Path(shard_index) if shard_index else None, ev, cl)
    sections = [
        summary_section(man, Path(generated_manifest) if generated_manifest else None, ev, cl, lists),
        dataset_section(man, Path(shard_index) if shard_index else None),
        training_section(Path(losses_csv) if losses_csv else None),
        generated_section(Path(generated_manifest) if generated_manifest else None),
        evaluation_section(ev),
        classification_section(cl, classify_absent),
        skipped_section(lists),
        config_section(config),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t in (
        ("summary", "At a glance"), ("dataset", "Dataset"), ("training", "Training"), ("generated", "Generated"),
        ("generation-quality", "Generation quality"), ("classification", "Classification"),
        ("skipped", "Skipped"), ("config", "Config")))
    weights = [(ev or {}).get("weights", {}).get("inception_score"), (ev or {}).get("weights", {}).get("lpips"),
               (cl or {}).get("weights")]
    warn = any(w and STAND_IN_MARK in w for w in weights)
    sub = f"dataset layout <b>{esc(layout)}</b>"
    if man is not None:
        sub += f" · {len(man)} images · {man['category'].nunique()} categories"
    if warn:
        sub += ' · <span class="badge stand-in">some numbers come from random stand-in weights</span>'
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>hybrid report: {esc(layout)}</title><style>{CSS}</style></head><body>"
            f'<header><div class="wrap"><h1>AnomalyHybrid report</h1><p>{sub}</p><nav>{nav}</nav></div></header>'
            f'<main class="wrap">{"".join(sections)}</main>'
            f"<footer>Written by the report stage of the hybrid workflow from the run's result files."
            f"</footer></body></html>\n")
    out_html = Path(out_html)
    write_text_atomic(out_html, page)
    log.info("report: wrote %s (%.1f kB)", out_html, len(page) / 1024)
    return out_html
