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
    return "anomaly" if int(r.label) else "normal"


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


# Published AnomalyHybrid numbers on MVTec AD (paper 003): Table 1's mean row (IS / cluster LPIPS /
# ResNet-34 accuracy, both decoders), Table 5's decoder rows (AHD / AHE accuracies as the text
# states them: AHE 1 point above AHD, both 5.2 above AHD) and Table 7's Hazelnut manipulation rows.
PAPER_GENERATION = {"AHD": {"is": 1.99, "accuracy": 47.4}, "AHE": {"is": 1.88, "accuracy": 48.4},
                    "both": {"is": 2.06, "lpips": 0.32, "accuracy": 52.6}}
PAPER_MANIPULATION = {"merge": (1.716, 0.320, 81.6), "remove": (1.668, 0.327, 53.1), "replace": (1.723, 0.321, 81.6),
                      "merge + remove + replace": (1.746, 0.321, 75.5), "all (with TPS)": (2.163, 0.326, 88.5)}


def evaluation_section(ev: Mapping | None) -> str:
    if ev is None:
        return section("generation-quality", "Generation quality", empty("The evaluate stage was not run."))
    rows = pd.DataFrame(ev["rows"])
    w = ev.get("weights", {})
    body = [f'<p class="caption">Inception Score and KID weights: {badge(w.get("inception_score", "?"))}<br>'
            f'Cluster LPIPS ({esc(ev.get("lpips_net", "?"))}) weights: {badge(w.get("lpips", "?"))}<br>'
            f'Settings: {esc(ev.get("settings", "?"))}</p>']
    if rows.empty:
        return section("generation-quality", "Generation quality", "".join(body) + empty("No rows."))
    cells = rows.assign(cell=[f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(rows["is_mean"], rows["lpips"])])
    pivot = cells.pivot(index="category", columns="decoder", values="cell")
    order = [c for c in ("AHD", "AHE", "both") if c in pivot.columns] + \
        [c for c in pivot.columns if c not in ("AHD", "AHE", "both")]
    cats = [c for c in pivot.index if c != "(mean)"] + [c for c in pivot.index if c == "(mean)"]
    pivot = pivot.loc[cats, order].fillna("–")
    industrial = list(ev.get("kinds", [])) == ["local"]
    if industrial:  # the published means beside ours (MVTec AD, paper 003 Tables 1 and 5)
        pivot.loc["paper 003 (MVTec AD mean)"] = [
            f"{_fmt(PAPER_GENERATION[c].get('is'), 2)} / {_fmt(PAPER_GENERATION[c].get('lpips'), 2)}"
            if c in PAPER_GENERATION else "–" for c in order]
    body.append('<p class="note">IS&thinsp;↑ / cluster LPIPS&thinsp;↑ per category and decoder (the layout of '
                f'paper 003 Tables 1 and 5); kinds scored: {esc(", ".join(ev.get("kinds", [])))}'
                + ("; centres and KID from the real eval anomalies (the base third fed generation)" if industrial
                   else "") + ".</p>")
    body.append(table(pivot, num=tuple(order), index=True))
    if "kid_mean" in rows.columns:
        kid = rows.assign(cell=[_fmt(v, 4) for v in rows["kid_mean"]]).pivot(index="category", columns="decoder",
                                                                             values="cell")
        kid = kid.loc[cats, order].fillna("–")
        body.append('<p class="note">KID&thinsp;↓ (torch-fidelity\'s definition: polynomial-kernel MMD on Inception '
                    "pool features) between the generated images and the real test anomalies of the category.</p>")
        body.append(table(kid, num=tuple(order), index=True))
    detail = rows.assign(IS=[f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(rows["is_mean"], rows["is_std"])],
                         LPIPS=[f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(rows["lpips"], rows["lpips_std"])],
                         KID=[f"{_fmt(m, 4)} ± {_fmt(s, 4)}" for m, s in
                              zip(rows.get("kid_mean", [None] * len(rows)), rows.get("kid_std", [None] * len(rows)))])
    cols = [c for c in ("category", "decoder", "n_images", "IS", "is_splits", "LPIPS", "n_centres", "n_clusters_used",
                        "KID", "n_real", "note") if c in detail.columns]
    body.append("<details><summary>All numbers (mean ± std over IS splits / over clusters / over KID subsets)"
                "</summary>" + table(detail[cols], num=tuple(c for c in cols if c not in ("category", "decoder",
                                                                                          "note"))) + "</details>")
    return section("generation-quality", "Generation quality", "".join(body))


def defects_section(cd: Mapping) -> str:
    """ResNet defect classification on generated anomalies (paper 003 Tables 1, 5 and 7)."""
    title = "Defect classification"
    rows = pd.DataFrame(cd.get("rows") or [])
    c = cd.get("config", {})
    body = [f'<p class="caption">{esc(c.get("arch", "resnet34"))} weights: {badge(cd.get("weights") or "?")}<br>'
            f'Trained per category on the generated local anomalies of each variant, labelled with the defect type '
            f'they were generated from; tested on the real eval anomalies (accuracy). Recipe: {esc(c.get("epochs"))} '
            f'epochs, Adam lr {esc(c.get("lr"))}, batch {esc(c.get("batch_size"))}, input {esc(c.get("input_size"))} '
            f'px, flips {esc(c.get("flips"))}.</p>']
    scored = rows[rows["variant"] != "all"] if not rows.empty else rows
    if scored.empty:
        return section("defects", title, "".join(body) + empty("No category could be scored (see Skipped)."))
    mains = scored[scored["manipulation"] == "all"]
    if not mains.empty:
        t = mains.assign(cell=[_fmt(100 * v, 1) if not _missing(v) else "–" for v in mains["accuracy"]]).pivot(
            index="category", columns="variant", values="cell")
        order = [v for v in ("AHD", "AHE", "both") if v in t.columns]
        cats = [x for x in t.index if x != "(mean)"] + [x for x in t.index if x == "(mean)"]
        t = t.loc[cats, order]
        t.loc["paper 003 (MVTec AD mean)"] = [_fmt(PAPER_GENERATION[v]["accuracy"], 1) for v in order]
        body.append('<h3>Accuracy (%) per decoder (the layout of paper 003 Tables 1 and 5)</h3>'
                    + table(t, num=tuple(order), index=True))
    subsets = scored[scored["manipulation"] != "all"]
    if not subsets.empty:
        t = subsets.assign(cell=[_fmt(100 * v, 1) if not _missing(v) else "–" for v in subsets["accuracy"]]).pivot(
            index=["category", "variant"], columns="manipulation", values="cell").fillna("–")
        pub = pd.DataFrame({"IS / LPIPS / accuracy": {k: f"{a} / {b} / {c}" for k, (a, b, c) in
                                                     PAPER_MANIPULATION.items()}}).rename_axis("manipulation")
        body.append('<h3>Accuracy (%) per manipulation subset (paper 003 Table 7\'s rows)</h3>'
                    + table(t, num=tuple(t.columns), index=True)
                    + '<p class="note">Published (paper 003 Table 7, Hazelnut, both decoders):</p>'
                    + table(pub, index=True))
    long = rows[[c for c in ("category", "variant", "manipulation", "accuracy", "n_train", "n_test", "classes", "note")
                 if c in rows.columns]].copy()
    long["accuracy"] = long["accuracy"].map(_fmt)
    body.append("<details><summary>One row per category, variant and subset</summary>"
                + table(long, num=("accuracy", "n_train", "n_test")) + "</details>")
    return section("defects", title, "".join(body))


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


def baselines_section(baselines_manifest: Path) -> str:
    """Model-free anomalies (Perlin, CutPaste) written like generated shards: counts and sheets."""
    title = "Baseline anomalies"
    if not Path(baselines_manifest).exists():
        return section("baselines", title, empty(f"{baselines_manifest} does not exist."))
    man = pd.read_parquet(baselines_manifest)
    counts = man.groupby(["category", "manipulation"]).size().unstack("manipulation", fill_value=0).reset_index()
    body = [f'<p class="note">{len(man)} model-free local anomalies (results/baselines/manifest.parquet): DRAEM\'s '
            "Perlin-noise blends (perlin/images: another normal image of the category as the anomaly source; "
            "perlin/textures: a texture folder) and CutPaste, from the normal images the generate stage draws "
            "from, in its shard format (kind local, decoder = method, mask = region).</p>",
            table(counts, num=tuple(c for c in counts.columns if c != "category"))]
    for p in sorted((Path(baselines_manifest).parent / "sheets").glob("*.png")):
        body.append(f"<h3>{esc(p.stem)}</h3>" + figure(p.read_bytes(), f"Contact sheet {esc(p.name)}: each source "
                                                          "image, then every method's output and mask.",
                                                          f"baselines {p.stem}"))
    return section("baselines", title, "".join(body))


# The seed README's category order (MVTec AD: textures, then objects).
README_ORDER = ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut", "metal_nut",
                "pill", "screw", "toothbrush", "transistor", "zipper")


def fewshot_table(rows: pd.DataFrame, metric: str, published: Mapping | None = None) -> pd.DataFrame:
    """The seed README's layout: one row per (setting, method), "Avg" then one column per category;
    with ``published`` (its per-setting dicts of category -> value), its PatchCore row above ours
    in each setting. Avg is the mean over the shown categories (published: only when it has them all)."""
    cats = sorted(set(rows["category"]), key=lambda c: (README_ORDER.index(c) if c in README_ORDER else 99, c))
    out: dict[str, list[str]] = {}
    order = {"one-shot": 0, "few-shot": 1, "full-shot": 2}
    keys = rows.assign(_k=[int(k) if str(k).isdigit() else 10**9 for k in rows["shots"]],
                       _s=rows["setting"].map(order))
    shown_published: set[str] = set()
    for (setting_name, shots), part in keys.sort_values(["_s", "_k"]).groupby(["_s", "shots"], sort=False):
        setting_name = part["setting"].iloc[0]
        if published and setting_name in published and setting_name not in shown_published:
            pub = published[setting_name]
            vals = [pub.get(c) for c in cats]
            avg = float(np.mean(vals)) if all(v is not None for v in vals) else None
            out[f"{setting_name} · PatchCore, published ({published.get('backbone', '?')})"] = [
                _fmt(avg), *(_fmt(v) for v in vals)]
            shown_published.add(setting_name)
        label = setting_name if setting_name != "few-shot" else f"few-shot (k={shots})"
        for method in dict.fromkeys(part["method"]):
            by_cat = part[part["method"] == method].set_index("category")[metric]
            vals = [by_cat.get(c) for c in cats]
            known = [float(v) for v in vals if not _missing(v)]
            avg = float(np.mean(known)) if len(known) == len(vals) and known else None
            out[f"{label} · {method}"] = [_fmt(avg), *(_fmt(v) for v in vals)]
    return pd.DataFrame.from_dict(out, orient="index", columns=["Avg", *cats]).rename_axis("setting · method")


def fewshot_section(fs: Mapping) -> str:
    """Few-shot PatchCore with and without generated normals, in the seed README's table layout."""
    title = "Few-shot detection"
    rows = pd.DataFrame(fs.get("rows") or [])
    pub = fs.get("published") or {}
    body = [f'<p class="caption">PatchCore backbone {esc(fs.get("backbone"))} ({esc(", ".join(fs.get("layers", [])))}) '
            f'weights: {badge(fs.get("weights", "?"))}<br>Generated normals: {esc(fs.get("generator", "none"))}</p>',
            '<p class="note">Per category, k real normal training images (a seeded draw, nested over k, never from '
            "the test set) fit PatchCore alone, or together with normal images generated from those same k "
            "images; both are scored on the real test set. k = 1 is one-shot, all is full-shot. "
            + ("The generator is the run's full model (fewshot.train_generator: false, the only setting so far): "
               "it was trained on every normal training image, not only on the k shots, so the + generated rows "
               "are an upper bound of what a generator trained on k images alone would give. "
               if fs.get("generator", "none") != "none" else "")
            + "</p>"]
    if rows.empty:
        return section("fewshot", title, "".join(body) + empty("No rows."))
    if pub:
        body.append(f'<h3>Image AUROC</h3><p class="note">Beside the published PatchCore '
                    f'({esc(pub.get("backbone", "?"))}) numbers from {esc(pub.get("source", "?"))}; those use real '
                    "ImageNet weights and an unstated k for few-shot, so compare them only with rows made with real "
                    "weights.</p>")
    else:
        body.append(f'<h3>Image AUROC</h3><p class="note">No published numbers beside these: '
                    f'{esc(fs.get("published_note") or "none were given")}.</p>')
    t = fewshot_table(rows, "image_auroc", pub)
    body.append(table(t, num=tuple(t.columns), index=True))
    for metric, name in (("pixel_auroc", "Pixel AUROC"), ("aupro", "AU-PRO (FPR up to 0.3)")):
        t = fewshot_table(rows, metric)
        body.append(f"<h3>{esc(name)}</h3>" + table(t, num=tuple(t.columns), index=True))
    cols = [c for c in ("category", "shots", "method", "n_real", "n_generated", "backbone_weights", "image_auroc",
                        "pixel_auroc", "aupro", "n_test", "n_test_anomalous", "n_test_no_mask", "memory_bank",
                        "fit_s", "predict_s") if c in rows.columns]
    long = rows[cols].copy()
    for c in ("image_auroc", "pixel_auroc", "aupro"):
        long[c] = long[c].map(_fmt)
    body.append("<details><summary>One row per category, k and method (anomalies without a mask count for the "
                "image metrics only: n_test_no_mask)</summary>"
                + table(long, num=tuple(c for c in cols if c not in ("category", "shots", "method",
                                                                    "backbone_weights"))) + "</details>")
    return section("fewshot", title, "".join(body))


# Published means of the downstream segmentation, in percent: pixel AUROC / AP / F1-max, image AUROC /
# AP / F1-max. MVTec AD: paper 003 Table 2, "Mean" row (15 categories, UNet trained on both decoders'
# anomalies; AnoHybrid+ adds generated normals). MVTec 3D-AD: paper 003 Table 4 (AnomalyHybrid rows;
# supplement 004 Table 8's mean row agrees for D and +, and gives RGB as 97.1/17.0/23.4, 85.7/95.3/92.8).
PAPER_SEGMENT_MEANS = {
    ("MVTec AD", "AnoHybrid"): (96.9, 72.9, 69.1, 94.3, 96.9, 95.7),
    ("MVTec AD", "AnoHybrid+"): (96.5, 71.5, 68.4, 94.4, 97.3, 95.8),
    ("MVTec 3D-AD", "rgb"): (96.9, 16.0, 23.2, 83.7, 94.8, 91.4),
    ("MVTec 3D-AD", "depth"): (94.2, 12.8, 19.1, 82.7, 94.5, 92.0),
    ("MVTec 3D-AD", "rgb+depth"): (98.4, 19.5, 26.4, 90.1, 97.1, 94.0),
}
SEG_PIXEL, SEG_IMAGE = ("pixel_auroc", "pixel_ap", "pixel_f1max"), ("image_auroc", "image_ap", "image_f1max")


def _short_note(note: object) -> str:
    """A mean row's note with only the names of the categories it leaves out (reasons: skipped records)."""
    text = "" if _missing(note) else str(note)
    head, sep, left = text.partition("; left out: ")
    if not sep:
        return text
    return f"{head}; left out: {', '.join(p.split(':', 1)[0] for p in left.split(' | '))} (see Skipped)"


def _pct3(row: Mapping, keys: tuple[str, ...]) -> str:
    return "/".join("–" if _missing(row.get(k)) else f"{100 * float(row[k]):.1f}" for k in keys)


def segmentation_section(seg: Mapping) -> str:
    """Downstream detection and localisation (paper 003 Table 2; Tables 4 / 8 with depth), the
    published means beside ours, and each category's strip of test images, ground truth and maps."""
    title = "Segmentation (downstream)"
    rows = pd.DataFrame(seg.get("rows") or [])
    m, tr, ms = seg.get("model", {}), seg.get("training", {}), seg.get("metric_settings", {})
    body = [f'<p class="caption">Network: {esc(m.get("note", m.get("arch")))}, base width {esc(m.get("base_width"))}, '
            f'input {esc(m.get("input_size"))} px (working resolution {esc(m.get("resolution"))}); trained '
            f'{esc(tr.get("steps"))} steps ({esc(tr.get("epochs"))} epochs x {esc(tr.get("epoch_length"))} samples, '
            f'batch {esc(tr.get("batch_size"))}, lr {esc(tr.get("lr"))}, {esc(tr.get("loss"))}, '
            f'{esc(tr.get("device"))} {esc(tr.get("precision"))}) on generated local anomalies (mask = their region) '
            f'and real normal images, half and half.<br>Image score: {esc(ms.get("image_score"))}; pixel metrics: '
            f'{esc(ms.get("pixel"))}; {esc(ms.get("aupro"))}. Test protocol: {esc(ms.get("test_protocol"))} '
            f'({esc(ms.get("base_anomalies_left_out", 0))} base-set anomalies left out).</p>']
    if rows.empty:
        return section("segmentation", title, "".join(body) + empty("No rows (see the skipped records)."))
    rgb = rows[rows["modality"] == "rgb"]
    variants = list(dict.fromkeys(rgb["variant"]))
    names = dict(zip(rows["variant"], rows["train_set"]))
    cats = [c for c in dict.fromkeys(rgb["category"]) if c != "(mean)"] + ["(mean)"]
    t2 = {}
    for v in variants:
        part = rgb[rgb["variant"] == v].set_index("category")
        for label, keys in (("pixel", SEG_PIXEL), ("image", SEG_IMAGE)):
            t2[f"{names[v]} · {label} AUC/AP/F1"] = [_pct3(part.loc[c], keys) if c in part.index else "–"
                                                     for c in cats]
    t2 = pd.DataFrame(t2, index=pd.Index(cats, name="category"))
    body.append('<h3>RGB (the layout of paper 003 Table 2)</h3><p class="note">Pixel-level and image-level AUROC / '
                "AP / F1-max in percent, per category and training set: AnoHybrid = anomalies from both decoders, "
                "AnoHybrid+ = and the generated normal images.</p>")
    body.append(table(t2, num=tuple(t2.columns), index=True))
    depth = rows[rows["modality"] != "rgb"]
    if not depth.empty:
        t8 = {}
        for v in variants:
            part = rows[(rows["variant"] == v)]
            for mod in ("rgb", "depth", "rgb+depth"):
                sub = part[part["modality"] == mod].set_index("category")
                t8[f"{names[v]} · {mod} pixel / image"] = [
                    f"{_pct3(sub.loc[c], SEG_PIXEL)} | {_pct3(sub.loc[c], SEG_IMAGE)}" if c in sub.index else "–"
                    for c in cats]
        t8 = pd.DataFrame(t8, index=pd.Index(cats, name="category"))
        body.append('<h3>RGB, depth and both (the layout of paper 003 Table 4 and supplement Table 8)</h3>'
                    '<p class="note">rgb: the model trained on generated RGB anomalies; depth: the 1-channel model '
                    "trained on the depth-level anomalies (AnomalyHybrid*); rgb+depth: the mean of the two maps. "
                    "Cells: pixel AUC/AP/F1 | image AUC/AP/F1, percent.</p>")
        body.append(table(t8, num=tuple(t8.columns), index=True))
    means = rows[rows["category"] == "(mean)"]
    comp = [{"source": "this run", "training set": names[r["variant"]], "modality": r["modality"],
             "pixel AUC/AP/F1": _pct3(r, SEG_PIXEL), "image AUC/AP/F1": _pct3(r, SEG_IMAGE),
             "note": _short_note(r.get("note"))} for r in means.to_dict("records")]
    comp += [{"source": f"paper 003 ({ds})", "training set": "AnoHybrid" if ds == "MVTec 3D-AD" else name,
              "modality": name if ds == "MVTec 3D-AD" else "rgb",
              "pixel AUC/AP/F1": "/".join(f"{x:.1f}" for x in v[:3]),
              "image AUC/AP/F1": "/".join(f"{x:.1f}" for x in v[3:]),
              "note": "Table 4 (MVTec 3D-AD mean)" if ds == "MVTec 3D-AD" else "Table 2, mean of 15 categories"}
             for (ds, name), v in PAPER_SEGMENT_MEANS.items()]
    body.append('<h3>Means beside the published ones</h3><p class="note">The papers train at 256 px on the full '
                "datasets with real edge and depth models; compare only runs made that way.</p>")
    body.append(table(pd.DataFrame(comp), num=("pixel AUC/AP/F1", "image AUC/AP/F1")))
    long = rows[["category", "variant", "modality", "n_train_anomalies", "n_train_normals", "n_generated_normals",
                 "n_test", "n_test_anomalies", *SEG_IMAGE, *SEG_PIXEL, "aupro", "note"]].copy()
    for c in (*SEG_IMAGE, *SEG_PIXEL, "aupro"):
        long[c] = long[c].map(_fmt)
    for c in ("n_train_anomalies", "n_train_normals", "n_generated_normals", "n_test", "n_test_anomalies"):
        long[c] = long[c].astype("Int64")
    body.append("<details><summary>All numbers (fractions; AU-PRO up to FPR 0.3)</summary>"
                + table(long, num=("n_train_anomalies", "n_train_normals", "n_generated_normals", "n_test",
                                   "n_test_anomalies", *SEG_IMAGE, *SEG_PIXEL, "aupro")) + "</details>")
    for category, path in (seg.get("strips") or {}).items():
        if Path(path).exists():
            body.append(f"<h3>{esc(category)}</h3>" + figure(
                Path(path).read_bytes(), f"{esc(category)}: test images (anomalies, then normal ones), the ground "
                "truth, and each model's anomaly map (blue 0, red 1).", f"segmentation {category}"))
    return section("segmentation", title, "".join(body))


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


def config_section(config: Mapping | None, auto_notes: list[str] | None = None) -> str:
    if not config:
        return section("config", "Configuration", empty("No configuration was given."))
    text = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False, allow_unicode=True)
    notes = ("<h3>What the auto settings chose</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in auto_notes)
             + "</ul>") if auto_notes else ""
    return section("config", "Configuration",
                   f'{notes}<p class="note">The configuration of this run, auto values resolved.</p>'
                   f'<pre>{esc(text)}</pre>')


AF_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def anomalyfactory_section(loc: Mapping) -> str:
    """AnomalyFactory (paper 002): Blaze localisation on the real test images, Boot vs Flare generation
    quality per region strategy (Tables 1-2), and each category's strips (Figs. 10-22)."""
    title = "AnomalyFactory"
    ms = loc.get("metric_settings", {})
    rows = pd.DataFrame(loc.get("rows") or [])
    body = [f'<p class="caption">BootGenerator → FlareGenerator → BlazeDetector; Blaze\'s heatmap on every real test '
            f'image (edges from the preprocess shards) is the anomaly map. Image score: {esc(ms.get("image_score"))}; '
            f'pixel metrics: {esc(ms.get("pixel"))}; {esc(ms.get("aupro"))}. Test protocol: '
            f'{esc(ms.get("test_protocol"))} ({esc(ms.get("base_anomalies_left_out", 0))} base-set anomalies left out).'
            '</p>']
    if rows.empty:
        body.append(empty("No localisation rows."))
    else:
        t = rows[["category", "n_test", "n_test_anomalies", "n_masks", *AF_METRICS, "note"]].copy()
        for c in AF_METRICS:
            t[c] = t[c].map(_fmt)
        body.append("<h3>Localisation (BlazeDetector)</h3>"
                    + table(t, num=("n_test", "n_test_anomalies", "n_masks", *AF_METRICS)))
    quality = _read_json(loc.get("quality"))
    if quality is not None:
        q = pd.DataFrame(quality.get("rows") or [])
        w = quality.get("weights", {})
        body.append(f'<h3>Generation quality: BootGenerator vs FlareGenerator (the layout of paper 002 Tables 1-2)</h3>'
                    f'<p class="note">IS&thinsp;↑ / cluster LPIPS×10&thinsp;↑ per dataset, category, region strategy, '
                    f'reference source and generator, {esc(quality.get("count"))} images each; '
                    f'{esc(quality.get("pairs", ""))}. Inception '
                    f'weights: {badge(w.get("inception_score", "?"))} LPIPS weights: {badge(w.get("lpips", "?"))}</p>')
        if not q.empty:
            for c, default in (("dataset", ""), ("reference", "self")):
                q[c] = q[c].fillna(default).astype(str) if c in q.columns else default
            q = q.assign(cell=[f"{_fmt(a, 2)} / {_fmt(b, 2)}" if not _missing(a) else "–"
                               for a, b in zip(q["is_mean"], q["lpips_x10"])])
            datasets = [d for d in dict.fromkeys(q.loc[q["category"] != "(mean)", "dataset"])]
            refs = list(dict.fromkeys(q["reference"]))
            # Table 1's layout: categories x (region strategy, generator), the images' own references
            t1 = q[q["reference"] == ("self" if "self" in refs else refs[0])]
            t1 = t1.assign(col=[f"{s} · {g}" for s, g in zip(t1["strategy"], t1["generator"])],
                           row=[(f"{d} / {c}" if len(datasets) > 1 else c) if c != "(mean)" else f"(mean) {d}"
                                for c, d in zip(t1["category"], t1["dataset"])])
            pivot = t1.pivot(index="row", columns="col", values="cell").fillna("–")
            cats = [c for c in pivot.index if not c.startswith("(mean)")] + [c for c in pivot.index
                                                                            if c.startswith("(mean)")]
            cols = list(dict.fromkeys(t1["col"]))
            if len(refs) > 1:
                body.append('<p class="note">Per category and region strategy, references: '
                            f'{esc(t1["reference"].iloc[0])}.</p>')
            body.append(table(pivot.loc[cats, cols], num=tuple(cols), index=True))
            if len(refs) > 1 or len(datasets) > 1:
                # Table 2's layout: datasets x (reference source, generator), means over the categories
                strategies = list(dict.fromkeys(q["strategy"]))
                strategy = "mixed" if "mixed" in strategies else strategies[0]
                m = q[(q["category"] == "(mean)") & (q["strategy"] == strategy)]
                m = m.assign(col=[f"{r} · {g}" for r, g in zip(m["reference"], m["generator"])],
                             row=[d if d != "(all)" else "(mean)" for d in m["dataset"]])
                t2 = m.pivot(index="row", columns="col", values="cell").fillna("–")
                order = [d for d in datasets if d in t2.index] + [r for r in t2.index if r not in datasets]
                cols2 = list(dict.fromkeys(m["col"]))
                body.append(f'<h4>Per dataset and reference source ({esc(strategy)} regions; the layout of paper 002 '
                            'Table 2): IS&thinsp;↑ / LPIPS×10&thinsp;↑, means over each dataset\'s categories; '
                            '"self" = each image its own reference, a dataset name = reference colours from that '
                            'dataset\'s normal images, the targets\' edited edges the same</h4>')
                body.append(table(t2.loc[order, cols2], num=tuple(cols2), index=True))
            notes = q[q["note"].fillna("") != ""][["dataset", "category", "strategy", "reference", "generator",
                                                  "note"]].drop_duplicates()
            if not notes.empty:
                body.append("<details><summary>Notes</summary>" + table(notes) + "</details>")
    for category, paths in (loc.get("strips") or {}).items():
        for key, caption in (("flare_blaze", "normal test images; Flare's selected regions, anomaly edges, anomaly "
                              "image and heatmap; Blaze's normal image and heatmap on Flare's anomaly (blue 0, red 1)"),
                             ("test", "real test anomalies: image, ground truth, edges, Blaze's normal image and "
                              "heatmap")):
            p = (paths or {}).get(key)
            if p and Path(p).exists():
                body.append(f"<h3>{esc(category)}</h3>" if key == "flare_blaze" else "")
                body.append(figure(Path(p).read_bytes(), f"{esc(category)}: {caption}.", f"anomalyfactory {category}"))
    return section("anomalyfactory", title, "".join(body))


# ----------------------------------------------------------------------------- the page


def _read_json(path: str | Path | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path is not None and Path(path).exists() else None


def run(
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
    baselines_manifest: str | Path | None = None,
    fewshot_json: str | Path | None = None,
    segment_json: str | Path | None = None,
    classify_defects_json: str | Path | None = None,
    auto_notes: list[str] | None = None,
    localize_json: str | Path | None = None,
) -> Path:
    """Write the report page to ``out_html`` and return its path. Any input may be None (its section
    says so); ``results/shards/skipped.parquet`` and ``results/generated/sheets/`` are found beside
    the shard index and the generated manifest. The baselines and few-shot sections appear only when
    their files are given (industrial layouts)."""
    man = pd.read_parquet(manifest) if manifest is not None else None
    ev, cl = _read_json(evaluate_json), _read_json(classify_json)
    fs = _read_json(fewshot_json)
    seg = _read_json(segment_json)
    cd = _read_json(classify_defects_json)
    af = _read_json(localize_json)
    ds = (config or {}).get("dataset") or {}
    layout = ", ".join(str(e.get("layout", "?")) for e in (ds if isinstance(ds, list) else [ds])) or "?"
    lists = skip_lists(Path(ingest_skipped) if ingest_skipped else None,
                       Path(shard_index) if shard_index else None, ev, cl)
    if fs is not None and fs.get("skipped"):
        lists.append(("Few-shot: categories not scored", pd.DataFrame(fs["skipped"], columns=["category", "reason"]),
                      True))
    if cd is not None:
        lists.append(("Classify defects: not scored or counted as errors", pd.DataFrame(
            cd.get("skipped", []), columns=["category", "variant", "manipulation", "reason"]), True))
    if seg is not None:
        lists.append(("Segment: not trained or not scored", pd.DataFrame(
            seg.get("skipped", []), columns=["category", "variant", "modality", "reason"]), True))
    sections = [
        summary_section(man, Path(generated_manifest) if generated_manifest else None, ev, cl, lists),
        dataset_section(man, Path(shard_index) if shard_index else None),
        training_section(Path(losses_csv) if losses_csv else None),
        generated_section(Path(generated_manifest) if generated_manifest else None),
        evaluation_section(ev),
        classification_section(cl, classify_absent),
        *([defects_section(cd)] if cd is not None else []),
        *([baselines_section(Path(baselines_manifest))] if baselines_manifest else []),
        *([fewshot_section(fs)] if fs is not None else []),
        *([segmentation_section(seg)] if seg is not None else []),
        *([anomalyfactory_section(af)] if af is not None else []),
        skipped_section(lists),
        config_section(config, auto_notes),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t in (
        ("summary", "At a glance"), ("dataset", "Dataset"), ("training", "Training"), ("generated", "Generated"),
        ("generation-quality", "Generation quality"), ("classification", "Classification"),
        *([("defects", "Defects")] if cd is not None else []),
        *([("baselines", "Baselines")] if baselines_manifest else []),
        *([("fewshot", "Few-shot")] if fs is not None else []),
        *([("segmentation", "Segmentation")] if seg is not None else []),
        *([("anomalyfactory", "AnomalyFactory")] if af is not None else []),
        ("skipped", "Skipped"), ("config", "Config")))
    weights = [(ev or {}).get("weights", {}).get("inception_score"), (ev or {}).get("weights", {}).get("lpips"),
               (cl or {}).get("weights"), (fs or {}).get("weights"), (cd or {}).get("weights")]
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
