"""The segment stage on a tiny synthetic industrial setup, and the segment + export rules end to end.

Real data: category "widget" (normal train images, normal test images, test anomalies with masks;
one anomaly marked as the protocol's base set) and "gizmo" (test anomalies, but generate made
nothing for it). Generated data: local anomalies from AHD and AHE with their regions, generated
normal images, and optionally aligned depth-level anomalies (depth_generated). Anomalies are bright
blobs on a grey texture, so a tiny network learns them in a few dozen steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hybrid.data.manifest import MANIFEST_COLUMNS, make_manifest
from hybrid.data.shards import build_index, write_shard
from hybrid.io import write_parquet_atomic
from hybrid.metrics.localization import image_score
from hybrid.models.unet import Segmenter
from hybrid.stages.segment import (
    COLUMNS,
    MEAN,
    METRICS,
    Inputs,
    Outputs,
    SegmentConfig,
    Stopped,
    focal_loss,
    lr_at,
    run,
)

S = 32
PROTOCOL = "protocol" in MANIFEST_COLUMNS  # the ingest helper's base / eval column
TINY = {"arch": "draem", "base_width": 4, "epochs": 2, "epoch_length": 16, "batch_size": 4, "lr": 1e-3,
        "variants": ["AHD", "both"], "plus_normals": [False, True], "device": "cpu", "checkpoint_every": 3,
        "log_every": 4, "strip_images": 4, "eval_batch_size": 8}

pytestmark = pytest.mark.usefixtures("one_thread")


def blob_mask(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S]
    cy, cx = rng.uniform(8, 24, 2)
    r = rng.uniform(3, 6)
    return (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8) * 255


def picture(rng: np.random.Generator, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A grey texture (image) and a smooth nearness map (depth); an anomaly is a bright red blob in
    the image and a bump in the depth."""
    img = np.clip(110 + rng.normal(0, 12, (S, S, 3)), 0, 255)
    yy, xx = np.mgrid[0:S, 0:S] / S
    depth = 0.3 + 0.4 * yy + 0.05 * rng.standard_normal((S, S))
    if mask is not None:
        m = mask > 127
        img[m] = (230, 40, 40)
        depth[m] += 0.4
    depth = np.clip(depth, 0, 1)
    return img.astype(np.uint8), (depth * 65535).round().astype(np.uint16)


def _write(dirpath: Path, name: str, arrays: dict, strings: dict) -> Path:
    path = dirpath / name
    write_shard(path, arrays, strings, {"resolution": S, "fingerprint": f"fp-{name}"})
    return path


def make_setup(root: Path, depth: bool = True, masks: bool = True, seed: int = 0) -> Inputs:
    """results/manifest.parquet, results/shards/, results/generated/ for widget and gizmo."""
    rng = np.random.default_rng(seed)
    rows, images, depths, mask_list, has = [], [], [], [], []
    groups = [("widget", "train", "good", 0, 8), ("widget", "test", "good", 0, 4), ("widget", "test", "crack", 1, 4),
              ("gizmo", "train", "good", 0, 3), ("gizmo", "test", "good", 0, 2), ("gizmo", "test", "dent", 1, 2)]
    for category, split, defect, label, count in groups:
        for i in range(count):
            m = blob_mask(rng) if label else None
            im, d = picture(rng, m)
            sid = f"mvtec_ad/{category}/{split}/{defect}/{i:03d}"
            row = {"sample_id": sid, "dataset": "mvtec_ad", "category": category, "split": split, "label": label,
                   "defect": defect, "image_path": f"/data/{sid}.png",
                   "mask_path": f"/data/{sid}_mask.png" if label else None}
            if PROTOCOL and label:
                row["protocol"] = "base" if i == 0 else "eval"
            rows.append(row)
            images.append(im)
            depths.append(d)
            give = label and (masks or i > 1)
            mask_list.append(m if give else np.zeros((S, S), np.uint8))
            has.append("1" if give else "0")
    manifest = make_manifest(rows, "test_segment")
    results = root / "results"
    write_parquet_atomic(manifest, results / "manifest.parquet")
    shard_dir = results / "shards"
    paths = []
    for k, lo in enumerate(range(0, len(rows), 10)):
        sl = slice(lo, lo + 10)
        paths.append(_write(shard_dir, f"shard-{k:05d}.h5",
                            {"image": np.stack(images[sl]), "edge": np.zeros((len(images[sl]), S, S), np.uint8),
                             "depth": np.stack(depths[sl]), "mask": np.stack(mask_list[sl])},
                            {"sample_id": manifest["sample_id"].tolist()[sl], "has_mask": has[sl]}))
    write_parquet_atomic(build_index(paths), shard_dir / "index.parquet")

    gen_rows, g_images, g_depth, g_region = [], [], [], []
    for kind, count in (("local", 5), ("normal", 2)):
        for i in range(count):
            for decoder in ("AHD", "AHE"):
                region = blob_mask(rng) if kind == "local" else np.zeros((S, S), np.uint8)
                im, d = picture(rng, region if kind == "local" else None)
                pair = f"{kind}-widget-{i:05d}"
                gen_rows.append({"sample_id": f"{pair}-{decoder}", "pair_id": pair, "reference_id": "r",
                                 "target_id": "t",
                                 "decoder": decoder, "manipulation": "merge" if kind == "local" else "none",
                                 "category": "widget", "defect": "", "kind": kind})
                g_images.append(im)
                g_depth.append(d)
                g_region.append(region)
    gen = pd.DataFrame(gen_rows)
    arrays = {"image": np.stack(g_images), "mask": np.stack(g_region), "region": np.stack(g_region)}
    if depth:
        arrays["depth_generated"] = np.stack(g_depth)
    gen_dir = results / "generated"
    p = _write(gen_dir, "shard-00000.h5", arrays, {c: gen[c].astype(str).tolist() for c in gen.columns})
    gen = build_index([p]).merge(gen, on="sample_id").assign(label=lambda d: (d["kind"] != "normal").astype("int8"))
    write_parquet_atomic(gen, gen_dir / "manifest.parquet")
    return Inputs(results / "manifest.parquet", shard_dir / "index.parquet", gen_dir / "manifest.parquet")


def outputs(root: Path) -> Outputs:
    r = root / "results"
    return Outputs(r / "metrics/segment.json", r / "metrics/segment.parquet", r / "segment/models",
                   r / "segment/strips")


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """The stage on the full setup (depth-level anomalies present): 4 variants x (rgb, depth)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("segment")
    inputs = make_setup(tmp_path)
    out = outputs(tmp_path)
    res = run(inputs, out, TINY, work_root=tmp_path / "results/segment/work")
    torch.set_num_threads(n)
    return tmp_path, inputs, out, res


def test_stage_writes_rows_models_strips_and_lists_skips(stage_run):
    tmp_path, inputs, out, res = stage_run

    saved = json.loads(out.json.read_text())
    assert saved["stage"] == "segment" and saved["modalities"] == ["rgb", "depth", "rgb+depth"]
    assert saved["depth_field"] == "depth"
    ms = saved["metric_settings"]
    assert ms["image_box"] == 21 and "21x21 mean filter" in ms["image_score"] and "AU-PRO" in ms["aupro"]
    assert saved["model"]["arch"] == "draem" and saved["model"]["input_size"] == 32
    assert saved["training"]["steps"] == 8 and saved["training"]["loss"].startswith("focal")
    table = pd.read_parquet(out.table)
    assert list(table.columns) == COLUMNS and len(saved["rows"]) == len(table)

    # widget: 4 variants x 3 modalities; means for each; gizmo skipped, named with its reason
    widget = table[table["category"] == "widget"]
    assert set(zip(widget["variant"], widget["modality"])) == {
        (v, m) for v in ("AHD", "AHD+normals", "both", "both+normals") for m in ("rgb", "depth", "rgb+depth")}
    assert widget[METRICS].notna().all().all()
    assert ((widget[METRICS] >= 0) & (widget[METRICS] <= 1)).all().all()
    names = dict(zip(widget["variant"], widget["train_set"]))
    assert names["both"] == "AnoHybrid" and names["both+normals"] == "AnoHybrid+"
    w = widget.set_index(["variant", "modality"])
    assert w.loc[("both", "rgb"), "n_train_anomalies"] == 10 and w.loc[("AHD", "rgb"), "n_train_anomalies"] == 5
    assert w.loc[("both+normals", "rgb"), "n_generated_normals"] == 4 and w.loc[("AHD+normals", "rgb"),
                                                                               "n_generated_normals"] == 2
    assert w.loc[("both", "rgb"), "n_train_normals"] == 8
    # the protocol's base-set anomaly is left out of the test set
    assert w.loc[("both", "rgb"), "n_test_anomalies"] == (3 if PROTOCOL else 4)
    assert w.loc[("both", "rgb"), "n_test"] == (7 if PROTOCOL else 8)
    assert saved["metric_settings"]["base_anomalies_left_out"] == (2 if PROTOCOL else 0)

    gizmo = [s for s in saved["skipped"] if s["category"] == "gizmo"]
    assert len(gizmo) == 12 and all("no generated local anomalies" in s["reason"] for s in gizmo)
    means = table[table["category"] == MEAN]
    assert len(means) == 12
    assert all("mean over 1 of 2 categories" in n and "gizmo: no generated local anomalies" in n for n in means["note"])
    both = means.set_index(["variant", "modality"]).loc[("both", "rgb")]
    assert both["pixel_ap"] == pytest.approx(w.loc[("both", "rgb"), "pixel_ap"])

    # models: save_pretrained folders that load; strips
    for key, folder in saved["models"].items():
        m = Segmenter.from_pretrained(folder)
        assert m.config["in_channels"] == (1 if key.endswith("/depth") else 3)
    assert len(saved["models"]) == 8 and (out.models / "widget/both_normals/rgb/model.safetensors").exists()
    strip = cv2.imread(str(out.strips / "widget.png"))
    assert saved["strips"] == {"widget": str(out.strips / "widget.png")} and strip.shape[0] > 4 * 128
    assert not (out.strips / "gizmo.png").exists()
    assert res["rows"] == saved["rows"]

    # a rerun with another scoring setting reuses the trained models (no training step logged)
    again = run(inputs, outputs(tmp_path / "again"), {**TINY, "image_box": 3},
                work_root=tmp_path / "results/segment/work")
    assert again["metric_settings"]["image_box"] == 3
    first = table.set_index(["category", "variant", "modality"])
    second = pd.read_parquet(outputs(tmp_path / "again").table).set_index(["category", "variant", "modality"])
    pd.testing.assert_series_equal(first["pixel_ap"], second["pixel_ap"])


def test_report_section_tables_published_means_strips_and_skips(stage_run, tmp_path):
    from hybrid.stages.report import PAPER_SEGMENT_MEANS
    from hybrid.stages.report import run as build_report
    from tests.test_report import Page

    root, inputs, out, res = stage_run
    html = build_report(tmp_path / "index.html", manifest=inputs.manifest, shard_index=inputs.index,
                        generated_manifest=inputs.generated, segment_json=out.json).read_text()
    page = Page()
    page.feed(html)
    assert "segmentation" in page.sections and page.stack == []
    row = next(r for r in res["rows"] if r["category"] == "widget" and r["variant"] == "both+normals"
               and r["modality"] == "rgb")
    cell = "/".join(f"{100 * row[k]:.1f}" for k in ("pixel_auroc", "pixel_ap", "pixel_f1max"))
    assert cell in page.cells  # Table 2 layout: pixel AUC/AP/F1 in percent
    assert "AnoHybrid+ · image AUC/AP/F1" in page.cells and "AnoHybrid · pixel AUC/AP/F1" in page.cells
    assert "96.9/72.9/69.1" in page.cells and "98.4/19.5/26.4" in page.cells  # Table 2 and Table 4 means
    assert len(PAPER_SEGMENT_MEANS) == 5
    assert any("rgb+depth pixel / image" in c for c in page.cells)  # Table 4 / 8 layout
    assert "max of the 21x21 mean filter" in html
    assert sum(src.startswith("data:image/png") for src in page.images) >= 2  # the strip among them
    assert "Segment: not trained or not scored" in html and "gizmo" in page.cells


def test_a_tiny_model_learns_the_blobs(tmp_path):
    inputs = make_setup(tmp_path, depth=False)
    cfg = {**TINY, "base_width": 8, "epochs": 6, "epoch_length": 40, "variants": ["both"], "plus_normals": [False],
           "lr": 2e-3}
    res = run(inputs, outputs(tmp_path), cfg, work_root=tmp_path / "work")
    assert res["modalities"] == ["rgb"]
    row = next(r for r in res["rows"] if r["category"] == "widget")
    assert row["pixel_auroc"] > 0.9 and row["image_auroc"] > 0.7, row


def test_resume_after_a_kill_reaches_the_same_weights(tmp_path):
    inputs = make_setup(tmp_path, depth=False)
    cfg = {**TINY, "variants": ["both"], "plus_normals": [False], "epochs": 3}  # 12 steps, checkpoints every 3
    whole = run(inputs, outputs(tmp_path / "a"), cfg, work_root=tmp_path / "work-a")
    with pytest.raises(Stopped, match="stopped at step 5 of 12"):
        run(inputs, outputs(tmp_path / "b"), cfg, work_root=tmp_path / "work-b", max_steps=5)
    work = next((tmp_path / "work-b").iterdir()) / "widget/both/rgb"
    assert [p.name for p in work.iterdir()] == ["ckpt-00000003"]  # step 4 and 5 are lost, as in a kill
    assert not (tmp_path / "b/results/metrics/segment.json").exists()
    resumed = run(inputs, outputs(tmp_path / "b"), cfg, work_root=tmp_path / "work-b")
    a = load_file(tmp_path / "a/results/segment/models/widget/both/rgb/model.safetensors")
    b = load_file(tmp_path / "b/results/segment/models/widget/both/rgb/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["rows"] == resumed["rows"]


def test_unet_arch_and_missing_masks(tmp_path):
    cfg = {**TINY, "arch": "unet", "variants": ["AHE"], "plus_normals": [False], "epochs": 1}
    res = run(make_setup(tmp_path / "a", depth=False), outputs(tmp_path / "a"), cfg, work_root=tmp_path / "a/work")
    assert res["model"]["arch"] == "unet" and res["model"]["input_size"] == 32
    model = Segmenter.from_pretrained(res["models"]["widget/AHE/rgb"])
    assert model.arch == "unet" and model.config["out_channels"] == 1
    assert [r["variant"] for r in res["rows"]] == ["AHE", "AHE"]  # widget and the mean

    inputs = make_setup(tmp_path, depth=False, masks=False)
    lacking = 1 if PROTOCOL else 2  # crack/000 (the base set, left out) and crack/001 have no mask
    with pytest.raises(ValueError, match=rf"{lacking} test anomalies of category 'widget' have no ground-truth "
                                         r"mask.*crack/001.*missing_masks: skip"):
        run(inputs, outputs(tmp_path), cfg, work_root=tmp_path / "work")
    res = run(inputs, outputs(tmp_path), {**cfg, "missing_masks": "skip", "test_protocol": "all"},
              work_root=tmp_path / "work")
    assert not [r for r in res["rows"] if r["category"] != MEAN]
    reasons = {s["category"]: s["reason"] for s in res["skipped"]}
    assert "have no ground-truth mask" in reasons["widget"] and "gizmo" in reasons
    assert all("left out: widget" in r["note"] for r in res["rows"])


def test_config_checks_and_depth_required(tmp_path):
    with pytest.raises(ValueError, match=r"unknown segment config key\(s\) \['epoch'\]"):
        SegmentConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="multiple of 32"):
        SegmentConfig(input_size=48)
    with pytest.raises(ValueError, match="variants"):
        SegmentConfig(variants=["AHX"])
    assert SegmentConfig.from_dict({"depth": "false"}).depth is False
    cfg = SegmentConfig()
    assert (cfg.arch, cfg.image_box, cfg.batch_size, cfg.lr, cfg.epochs, cfg.epoch_length) == ("draem", 21, 8, 1e-4,
                                                                                              200, 500)
    assert [lr_at(cfg, e) for e in (0, 159, 160, 180, 199)] == pytest.approx([1e-4, 1e-4, 2e-5, 4e-6, 4e-6])
    inputs = make_setup(tmp_path, depth=False)
    with pytest.raises(ValueError, match="depth_generated"):
        run(inputs, outputs(tmp_path), {**TINY, "depth": True}, work_root=tmp_path / "work")


def test_focal_loss_is_draems():
    """Against DRAEM's FocalLoss written out: one-hot clamped to [smooth, 1 - smooth], pt + smooth."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 2, 5, 5, generator=g).softmax(1)
    target = (torch.rand(2, 1, 5, 5, generator=g) > 0.7).float()
    logit = probs.permute(0, 2, 3, 1).reshape(-1, 2)
    one_hot = torch.zeros(len(logit), 2).scatter_(1, target.reshape(-1, 1).long(), 1).clamp(1e-5, 1 - 1e-5)
    pt = (one_hot * logit).sum(1) + 1e-5
    want = (-(1 - pt) ** 2 * pt.log()).mean()
    assert focal_loss(probs, target).item() == pytest.approx(want.item(), rel=1e-6)
    # the image score is AnomalyDiffusion's: max of the 21x21 mean filter (zero padding)
    m = torch.zeros(1, 32, 32)
    m[0, 10, 10] = 1.0
    assert image_score(m, sigma=0, box=21).item() == pytest.approx(1 / 441)


# ----------------------------------------------------------------------------- end to end

def mvtec_tree(root: Path, seed: int = 0) -> None:
    """A tiny MVTec AD tree: widget with train/good, test/good, test/crack and masks."""
    rng = np.random.default_rng(seed)
    for split, defect, n in (("train", "good", 6), ("test", "good", 3), ("test", "crack", 6)):
        for i in range(n):
            m = blob_mask(rng) if defect != "good" else None
            im, _ = picture(rng, m)
            d = root / "widget" / split / defect
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{i:03d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
            if m is not None:
                g = root / "widget" / "ground_truth" / defect
                g.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(g / f"{i:03d}_mask.png"), m)


@pytest.mark.slow
def test_segment_and_export_rules_end_to_end(tmp_path):
    """ingest -> preprocess (tiny random Depth Anything) -> train -> generate -> segment, export, report."""
    from tests.tiny_models import save_tiny_depth_anything
    from tests.workflow_helpers import scheduled, snakemake, write_config

    mvtec_tree(tmp_path / "mvtec")
    depth = tmp_path / "weights" / "da"
    save_tiny_depth_anything(depth)
    import yaml

    from tests.workflow_helpers import REPO

    sections = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    others = {s: {"enabled": False} for s in ("baselines", "fewshot", "classify_defects") if s in sections}
    write_config(tmp_path, {
        **others,
        "dataset": {"layout": "mvtec_ad", "options": {"root": str(tmp_path / "mvtec")}},
        "preprocess": {"depth_source": "depth_anything_small"},
        "models": {"paths": {"depth_anything_small": str(depth)}},
        "generate": {"global": {"count": 1, "pairing": "random", "groups": []}, "local": {"count": 3},
                     "normal": {"count": 2, "match": []}},
        "evaluate": {"n_centres": 2},
        "segment": {"base_width": 4, "epochs": 1, "epoch_length": 8, "batch_size": 4, "variants": ["both"],
                    "plus_normals": [False, True], "device": "cpu", "strip_images": 4},
        "export": {"enabled": True},
    })
    assert {"segment", "export"} <= set(scheduled(tmp_path))
    snakemake(tmp_path, "--cores", "2")
    r = tmp_path / "results"
    seg = json.loads((r / "metrics/segment.json").read_text())
    rows = pd.DataFrame(seg["rows"]).set_index(["category", "variant", "modality"])
    assert {("widget", "both", "rgb"), ("widget", "both+normals", "rgb"), (MEAN, "both", "rgb")} <= set(rows.index)
    assert rows.loc[("widget", "both", "rgb"), "n_test_anomalies"] == (4 if PROTOCOL else 6)
    assert (r / "segment/strips/widget.png").exists() and (r / "segment/models/widget/both/rgb/config.json").exists()
    assert (r / "logs/segment.log").exists() and (r / "benchmarks/segment.tsv").exists()
    html = (r / "report/index.html").read_text()
    assert 'id="segmentation"' in html and "AnoHybrid+" in html and "Table 2" in html
    from hybrid.data.mvtec import read_mvtec_ad

    exported = read_mvtec_ad(r / "export")
    assert set(exported["category"]) == {"widget"} and (exported["split"] == "test").any()
    assert not {"segment", "export"} & set(scheduled(tmp_path))  # nothing of ours reruns on an unchanged tree
    # a segmentation setting reruns segment and what reads it, not export or anything upstream
    assert set(scheduled(tmp_path, "--config", "segment={epochs: 2}")) == {"segment", "report", "all"}
