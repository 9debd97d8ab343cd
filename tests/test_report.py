"""The HTML report: every section, images embedded, tables, weights labels, valid self-contained HTML."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import yaml

from hybrid.stages.classify import RESULT_COLUMNS
from hybrid.stages.evaluate import COLUMNS as EVALUATE_COLUMNS
from hybrid.stages.report import run as build_report
from tests.stage_data import REPO_CONFIG, make_generated, make_losses, make_real

STAND_IN = "random stand-in (numbers not comparable to papers)"
SECTIONS = {"summary", "dataset", "training", "generated", "generation-quality", "classification", "skipped", "config"}
VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Collects section ids, images, links and table cells, and checks that tags nest."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.sections: list[str] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.cells: list[str] = []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.images.append(a["src"])
        self.urls += [a[k] for k in ("href", "src") if k in a and tag != "img"]
        if tag in ("td", "th"):
            self.in_cell = True
            self.cells.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.cells[-1] += data


def evaluate_json(path) -> None:
    """An evaluate.json in the stage's layout: one real and one stand-in label, one skip."""
    base = dict.fromkeys(EVALUATE_COLUMNS)
    rows = [{**base, "category": "erato", "decoder": d, "n_images": 4, "is_mean": 1.234 + i, "is_std": 0.01,
             "is_splits": 2, "lpips": 0.321 + i, "lpips_std": 0.02, "n_centres": 3, "n_clusters_used": 2,
             "note": ""} for i, d in enumerate(("AHD", "AHE", "both"))]
    rows.append({**base, "category": "melpomene", "decoder": "both", "n_images": 4, "is_mean": 1.5,
                 "note": "LPIPS skipped"})
    path.write_text(json.dumps({
        "weights": {"inception_score": "real: pt_inception-2015-12-05-6726825d.pth",
                    "lpips": f"{STAND_IN}: backbone random, linear real: vgg.pth"},
        "lpips_net": "vgg", "kinds": ["global", "local"], "kinds_left_out": {"normal": 4}, "rows": rows,
        "skipped": [{"category": "melpomene", "decoder": "all", "metric": "lpips",
                     "reason": "1 real test anomalies <script>alert(1)</script>"}]}))


def classify_json(path) -> None:
    rows = []
    for j, ts in enumerate(("train", "train+AHD", "train+AHE", "train+both")):
        for k, head in enumerate(("linear", "sgd")):
            rows.append({**dict.fromkeys(RESULT_COLUMNS), "head": head, "train_set": ts, "n_train": 16,
                         "n_generated": 5 * j, "major_recall": 0.5 + 0.1 * k, "minor_recall": 0.25,
                         "mimic_recall": 0.125, "challenge_score": 0.2 + 0.01 * j + 0.001 * k, "weights": STAND_IN})
    path.write_text(json.dumps({"weights": STAND_IN, "model": "dinov2_base", "feature_dim": 128,
                                "reference_csv": "/x/ref_test.csv", "counts": {"train": 16, "test": 24},
                                "rows": rows, "skipped": [{"what": "reference row", "id": "gone_1.JPG",
                                                           "reason": "not in the shards"}]}))


def run(tmp_path, with_classify: bool = True):
    real = make_real(tmp_path)
    gen = make_generated(tmp_path, per_decoder={"erato": 2, "melpomene": 1})
    metrics = tmp_path / "results" / "metrics"
    metrics.mkdir(parents=True)
    evaluate_json(metrics / "evaluate.json")
    classify_json(metrics / "classify.json")
    config = yaml.safe_load(REPO_CONFIG.read_text())
    out = build_report(tmp_path / "results" / "report" / "index.html", config=config, manifest=real["manifest"],
                       shard_index=real["index"], ingest_skipped=real["ingest_skipped"],
                       losses_csv=make_losses(tmp_path), generated_manifest=gen,
                       evaluate_json=metrics / "evaluate.json",
                       classify_json=metrics / "classify.json" if with_classify else None)
    text = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    return text, page


def test_report_has_every_section_embedded_images_tables_and_weights(tmp_path):
    text, page = run(tmp_path)
    assert text.startswith("<!DOCTYPE html>") and page.stack == []  # every tag closed, in order
    assert set(page.sections) == SECTIONS and len(page.sections) == len(SECTIONS)

    # Images: dataset sheet, loss curves, one generated sheet per category, all inline PNGs.
    assert len(page.images) == 4
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Self-contained: the only links are anchors within the page.
    assert page.urls and all(u.startswith("#") for u in page.urls)
    assert not re.search(r"https?://|//cdn|@import|url\(", text)

    # Generation table (IS / LPIPS per category and decoder) and Table 6 layout for classification.
    assert "1.234 / 0.321" in page.cells and "3.234 / 2.321" in page.cells and "1.500 / –" in page.cells
    for name in ("SignalHybrid", "Non-SignalH", "MimicHybrid", "HMean", "train+AHD", "train+both"):
        assert name in page.cells
    assert "0.500 / 0.600" in page.cells and "0.230 / 0.231" in page.cells  # linear / sgd per cell

    # Which weights produced what, per figure and table.
    assert "real: pt_inception-2015-12-05-6726825d.pth" in text
    assert f"{STAND_IN}: backbone random, linear real: vgg.pth" in text
    assert 'class="badge real"' in text and 'class="badge stand-in"' in text

    # Every skip list, escaped (no markup from data gets through).
    for item in ("/data/images/absent.jpg", "heliconius/train/broken", "truncated JPEG", "gone_1.JPG", "normal"):
        assert item in page.cells
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<span>skipped records</span><b>4</b>" in text  # ingest, preprocess, evaluate, classify
    # The configuration of the run.
    assert "layout: demo" in text and "train_per_subspecies" in text


def test_report_without_classify_says_why(tmp_path):
    text, page = run(tmp_path, with_classify=False)
    assert set(page.sections) == SECTIONS
    assert "not part of this run" in text and "SignalHybrid" not in page.cells


def test_industrial_tables_beside_the_published_numbers(tmp_path):
    """Defect accuracy per decoder (Tables 1 / 5) and per manipulation (Table 7), KID, the paper's means."""
    from hybrid.stages.classify_defects import COLUMNS as DEFECT_COLUMNS

    real = make_real(tmp_path)
    metrics = tmp_path / "results" / "metrics"
    metrics.mkdir(parents=True)
    evaluate_json(metrics / "evaluate.json")
    ev = json.loads((metrics / "evaluate.json").read_text())
    ev["kinds"] = ["local"]
    for r in ev["rows"]:
        r["kid_mean"] = 0.0123
    (metrics / "evaluate.json").write_text(json.dumps(ev))
    rows = [{**dict.fromkeys(DEFECT_COLUMNS), "category": c, "variant": v, "manipulation": m,
             "accuracy": 0.5 + 0.1 * i, "n_train": 10, "n_test": 4}
            for c in ("bottle", "(mean)") for i, v in enumerate(("AHD", "AHE", "both")) for m in ("all", "merge")]
    rows.append({**dict.fromkeys(DEFECT_COLUMNS), "category": "pill", "variant": "all", "manipulation": "all",
                 "note": "1 generated defect type(s) (crack); classification needs 2"})
    (metrics / "classify_defects.json").write_text(json.dumps({
        "weights": STAND_IN, "rows": rows, "config": {"arch": "resnet34", "epochs": 30},
        "skipped": [{"category": "pill", "reason": "1 generated defect type(s) (crack); classification needs 2"}]}))
    out = build_report(tmp_path / "index.html", config=yaml.safe_load(REPO_CONFIG.read_text()),
                       manifest=real["manifest"], evaluate_json=metrics / "evaluate.json",
                       classify_defects_json=metrics / "classify_defects.json")
    text = out.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert "defects" in page.sections
    assert {"50.0", "60.0", "70.0"} <= set(page.cells)  # accuracy (%) per decoder
    assert {"47.4", "48.4", "52.6"} <= set(page.cells)  # paper 003's per-decoder accuracies beside ours
    assert "1.716 / 0.32 / 81.6" in page.cells  # Table 7, merge
    assert "2.06 / 0.32" in page.cells and "0.0123" in page.cells  # Table 1 mean; KID
    assert "classification needs 2" in text and "pill" in page.cells
