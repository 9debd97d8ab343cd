"""FlareGenerator: frozen-Boot targets, the heatmap loss, training pairs, resume, per-dataset draws, bad inputs."""

import contextlib
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hybrid.augment import AugmentConfig
from hybrid.checkpoint import load_checkpoint, load_state
from hybrid.manipulate import ManipulateConfig
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator
from hybrid.stages.boot import BOOT_MODEL, subsample_per_dataset
from hybrid.stages.flare import FlareConfig, ManipulatedPairs, af_step, flare_targets, training_set
from hybrid.stages.flare import run as run_flare
from hybrid.train import TrainConfig
from tests.af_data import AUGMENT, MANIPULATE, TRAIN, make_results, save_af_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
FLARE = {"epochs": 1, "batch_size": 4, "noise_std": 0.1, "region_mix": 0.0}


def flare_run(data, boot, out, **kw):
    return run_flare(data["index"], data["manifest"], boot, out / "ckpt", out / "losses.csv", out / "samples",
                     out / "work", TRAIN, {**FLARE, **kw.pop("flare", {})}, AUGMENT, MANIPULATE, **kw)


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def toy_batch(g, n=8, s=32):
    """Reference colours, edges that are dense noise inside a random rectangle (the region) only."""
    ref = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1 + 0.2 * torch.randn(n, 3, s, s, generator=g)).clamp(-1, 1)
    region = torch.zeros(n, 1, s, s)
    for i in range(n):
        x0, y0 = torch.randint(0, s - 12, (2,), generator=g).tolist()
        w, h = torch.randint(6, 12, (2,), generator=g).tolist()
        region[i, 0, y0:y0 + h, x0:x0 + w] = 1
    edge = torch.where(region > 0, (torch.rand(n, 1, s, s, generator=g) < 0.4).float(), torch.zeros_like(region))
    return {"reference_image": ref, "target_edge": edge * 2 - 1, "region": region}


def test_targets_come_from_the_frozen_boot_and_only_flare_learns(tmp_path):
    torch.manual_seed(0)
    boot = Generator(**BOOT_MODEL, ngf=4, n_downsample=2, n_blocks=1).eval().requires_grad_(False)
    G = Generator(**BOOT_MODEL, ngf=4, n_downsample=2, n_blocks=1)
    G.load_state_dict(boot.state_dict())
    D = MultiscaleDiscriminator(7, 4, 3, 2)
    before_boot = {k: v.clone() for k, v in boot.state_dict().items()}
    before_G = {k: v.clone() for k, v in G.state_dict().items()}
    batch = toy_batch(torch.Generator().manual_seed(0), n=4)
    t = flare_targets(G, boot, batch)
    with torch.no_grad():
        expect = boot(torch.cat([batch["reference_image"], batch["target_edge"]], 1))["AHE"]["image"]
    assert torch.equal(t["target"], expect) and torch.equal(t["heat"], batch["region"])
    assert not t["target"].requires_grad
    cfg = TrainConfig(perceptual="none", lambda_l1=10.0, ndf=4)
    opts = [torch.optim.Adam(m.parameters(), lr=2e-4) for m in (G, D)]
    noise = torch.randn(4, *G.feature_shape(32, 32)) * 0.1
    losses, out = af_step(G, D, None, *opts, t["cond"], t["target"], t["heat"], 10.0, noise, cfg,
                          contextlib.nullcontext())
    assert losses["G_heat"] > 0 and set(losses) >= {"G_gan", "G_feat", "G_l1", "D_total"}
    assert all(torch.equal(v, before_boot[k]) for k, v in boot.state_dict().items())
    assert all(p.grad is None for p in boot.parameters())
    assert any(not torch.equal(v, before_G[k]) for k, v in G.state_dict().items())


def test_heatmap_loss_pulls_the_heatmap_onto_the_region():
    """A toy problem where only the heatmap term says where the region is (target = the reference, no
    pixel loss): within 150 CPU steps the thresholded heatmap overlaps the region with IoU > 0.5, and
    without the term (w_fh = 0) it does not."""
    def trained_iou(w_fh: float) -> float:
        torch.manual_seed(0)
        G = Generator(**BOOT_MODEL, ngf=8, n_downsample=2, n_blocks=1)
        D = MultiscaleDiscriminator(7, 8, 3, 1)
        cfg = TrainConfig(perceptual="none", lambda_l1=0.0, lambda_feat=0.0, ndf=8, num_D=1)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999)) for m in (G, D)]
        g = torch.Generator().manual_seed(1)
        for _ in range(150):
            b = toy_batch(g)
            cond = torch.cat([b["reference_image"], b["target_edge"]], 1)
            af_step(G, D, None, *opts, cond, b["reference_image"], b["region"], w_fh, None, cfg,
                    contextlib.nullcontext())
        b = toy_batch(torch.Generator().manual_seed(99), n=32)
        with torch.no_grad():
            h = G(torch.cat([b["reference_image"], b["target_edge"]], 1))["AHE"]["mask"] > 0.5
        r = b["region"] > 0.5
        return float((h & r).sum() / (h | r).sum().clamp(min=1))

    assert trained_iou(10.0) > 0.5
    assert trained_iou(0.0) < 0.2


class Labels:
    """A RegionStore stand-in: one candidate map for every sample."""

    available, status, note = True, "sam", ""

    def __init__(self, labels):
        self.labels = labels

    def get(self, sample_id):
        return self.labels


def test_manipulated_pairs_edit_edges_only_inside_the_region_and_replay(tmp_path):
    data = make_results(tmp_path)
    base, _ = training_set(data["index"], data["manifest"], None, None, 0, "test")
    man = ManipulateConfig.from_dict({**MANIPULATE, "manipulations": ["remove", "replace", "merge"]})
    pairs = ManipulatedPairs(base, AugmentConfig.from_dict({**AUGMENT, "rtp_prob": 0.0}), man,
                             ("remove", "replace", "merge"), 0.0, None, 3, seed=5)
    a, b = pairs[(0, 3)], pairs[(0, 3)]
    assert all(torch.equal(a[k], b[k]) for k in a)  # a pure function of (seed, epoch, index)
    assert not torch.equal(pairs[(1, 3)]["region"], a["region"])
    changed = 0
    for i in range(len(pairs)):
        p = pairs[(0, i)]
        region = p["region"] > 0.5
        assert region.any() and p["semantic"] == 0
        assert torch.equal(p["target_edge"][~region], p["normal_edge"][~region])  # outside: untouched
        changed += int(not torch.equal(p["target_edge"], p["normal_edge"]))
    assert changed >= len(pairs) // 2
    # semantic regions: a union of candidates of the sample's map, moved with the flip (not by TPS)
    labels = np.zeros((32, 32), np.uint8)
    labels[4:12, 4:12], labels[20:28, 18:30] = 1, 2
    sem = ManipulatedPairs(base, AugmentConfig.from_dict({"tps_prob": 0.0, "rtp_prob": 0.0, "flip_lr": 0.0,
                                                          "flip_tb": 0.0}), man, ("remove",), 1.0, Labels(labels), 3,
                           seed=5)
    p = sem[(0, 0)]
    region = p["region"][0] > 0.5
    assert p["semantic"] == 1
    assert torch.equal(region, torch.from_numpy(np.isin(labels, [1]) | np.isin(labels, [2]))) or \
        torch.equal(region, torch.from_numpy(labels == 1)) or torch.equal(region, torch.from_numpy(labels == 2))
    assert (p["target_edge"][0][region] == -1).all()  # remove clears the edges in the region


def test_flare_trains_from_boot_resumes_exactly_and_leaves_boot_alone(tmp_path):
    data = make_results(tmp_path)
    boot = save_af_checkpoint(tmp_path / "boot", "boot")
    stamp = digest(boot)
    straight = flare_run(data, boot, tmp_path / "a")  # 14 images, batch 4: 4 steps
    assert digest(boot) == stamp
    G = load_checkpoint(straight)
    cfg = __import__("json").loads((straight / "config.json").read_text())
    assert cfg["anomalyfactory"]["stage"] == "flare" and cfg["anomalyfactory"]["w_fh"] == 10.0
    assert cfg["augment"]["tps_prob"] == 0.0  # local TPS is Boot's only
    boot_w, flare_w = load_file(boot / "model.safetensors"), load_file(straight / "model.safetensors")
    assert any(not torch.equal(boot_w[k], flare_w[k]) for k in boot_w)
    assert G.config["conditions"] == ["reference_image", "target_edge"]
    losses = pd.read_csv(tmp_path / "a" / "losses.csv")
    assert list(losses["step"]) == [1, 2, 3, 4] and (losses["G_heat"] > 0).all()
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    # killed after step 3 (the step-2 checkpoint remains), then resumed: the same weights and optimiser
    work = tmp_path / "b"
    last = flare_run(data, boot, work, max_steps=3)
    assert last.name == "ckpt-00000002" and not (work / "ckpt").exists()
    resumed = flare_run(data, boot, work)
    for name in ("model.safetensors", "discriminator.safetensors"):
        wa, wb = load_file(straight / name), load_file(resumed / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert load_state(resumed)["step"] == 4
    assert pd.read_csv(work / "losses.csv").equals(losses)


def test_a_failed_flare_rerun_keeps_the_published_checkpoint_and_says_where(tmp_path, monkeypatch):
    import hybrid.stages.flare as flare_stage
    from hybrid.checkpoint import PUBLISHED

    data = make_results(tmp_path)
    boot = save_af_checkpoint(tmp_path / "boot", "boot")
    out = flare_run(data, boot, tmp_path / "a")
    first = digest(out)
    kept = tmp_path / "a" / "work" / PUBLISHED
    assert digest(kept) == first

    def dies(*args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(flare_stage, "train_af", dies)
    (tmp_path / "a" / "ckpt").rename(tmp_path / "gone")  # Snakemake removes the output of the job it reruns
    with pytest.raises(RuntimeError) as e:
        flare_run(data, boot, tmp_path / "a", flare={"noise_std": 0.2})  # other settings, then a failure
    assert f"the last published checkpoint is kept in {kept}" in "\n".join(e.value.__notes__)
    assert digest(kept) == first


def test_flare_without_or_with_a_wrong_boot_checkpoint_names_what_to_make(tmp_path):
    data = make_results(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        flare_run(data, tmp_path / "nothing", tmp_path / "f")
    msg = str(e.value)
    assert "results/anomalyfactory/boot/checkpoint" in msg and "boot rule" in msg and "no config.json" in msg
    ah = save_af_checkpoint(tmp_path / "ah", "boot", model={"ngf": 4, "n_downsample": 2, "n_blocks": 1})
    with pytest.raises(ValueError) as e:
        flare_run(data, ah, tmp_path / "f")
    msg = str(e.value)
    assert "target_depth" in msg and "not AnomalyFactory" in msg and "results/anomalyfactory/boot/checkpoint" in msg
    flare = save_af_checkpoint(tmp_path / "fl", "flare")
    with pytest.raises(ValueError, match="holds a Flare checkpoint"):
        flare_run(data, flare, tmp_path / "f")


def test_semantic_regions_without_sam_output_fail_or_fall_back(tmp_path):
    from hybrid.regions import write_regions

    data = make_results(tmp_path)
    boot = save_af_checkpoint(tmp_path / "boot", "boot")
    with pytest.raises(ValueError, match="sam_regions"):
        flare_run(data, boot, tmp_path / "f", flare={"region_mix": 0.5})
    fallback = tmp_path / "regions.h5"
    write_regions(fallback, np.zeros((0, 1, 1), np.uint8), [], {"status": "fallback", "note": "no SAM weights"})
    with pytest.raises(ValueError, match="semantic_fallback"):
        flare_run(data, boot, tmp_path / "f", flare={"region_mix": 0.5}, regions=fallback)
    work = flare_run(data, boot, tmp_path / "f", flare={"region_mix": 0.5, "semantic_fallback": True},
                     regions=fallback, max_steps=1)  # no checkpoint yet: the work folder comes back
    assert (pd.read_csv(work / "losses.csv")["semantic"] == 0).all()  # stochastic regions only


def test_per_dataset_draw_is_balanced_per_category_seeded_and_checked(caplog):
    # dataset a: categories x (12 images) and y (3); dataset b: one category of 10
    rows = pd.DataFrame({"sample_id": [f"s{i}" for i in range(25)], "dataset": ["a"] * 15 + ["b"] * 10,
                         "category": ["x"] * 12 + ["y"] * 3 + ["z"] * 10})
    with caplog.at_level("INFO"):
        one = subsample_per_dataset(rows, {"a": 5}, seed=0)  # 5 per category, as the paper's "200x12 from VisA"
    assert one.groupby("category").size().to_dict() == {"x": 5, "y": 3, "z": 10}  # y has fewer: all of it
    assert "a / y has 3 images, fewer than 5: all of them" in caplog.text
    assert one.equals(subsample_per_dataset(rows, {"a": 5}, seed=0))
    assert not one.equals(subsample_per_dataset(rows, {"a": 5}, seed=1))
    assert subsample_per_dataset(rows, {"a": 2, "b": 4}, 0).groupby("category").size().to_dict() == {
        "x": 2, "y": 2, "z": 4}
    assert subsample_per_dataset(rows, {}, 0).equals(rows)
    with pytest.raises(ValueError, match="'c'"):
        subsample_per_dataset(rows, {"c": 2}, 0)


def test_flare_config_checks_names_the_key():
    with pytest.raises(ValueError, match="unknown anomalyfactory.flare config key"):
        FlareConfig.from_dict({"w_fg": 1.0})
    with pytest.raises(ValueError, match="unknown manipulation 'swap'"):
        FlareConfig.from_dict({"manipulations": ["swap"]})
    assert FlareConfig().w_fh == 10.0 and FlareConfig().epochs == 5


def test_boot_is_the_train_stage_with_the_af_model_and_the_per_dataset_draw(tmp_path):
    import json

    from hybrid.stages.boot import run as run_boot

    data = make_results(tmp_path)
    ah_model = {"level": "rgb", "conditions": ["reference_image", "target_depth", "target_edge"],
                "decoders": ["AHD", "AHE"], "ngf": 4, "n_downsample": 2, "n_blocks": 1}
    out = run_boot(data["index"], data["manifest"], tmp_path / "boot" / "ckpt", tmp_path / "boot" / "losses.csv",
                   tmp_path / "boot" / "samples", tmp_path / "boot" / "work", ah_model, {**TRAIN, "epochs_decay": 9},
                   {"epochs": 0, "epochs_decay": 1, "batch_size": 4}, {"tps_prob": 0.99}, per_dataset={"toy_a": 4})
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg["model"][k] for k in BOOT_MODEL} == BOOT_MODEL and cfg["model"]["ngf"] == 4
    assert cfg["train"]["epochs_decay"] == 1 and cfg["augment"]["tps_prob"] == 0.99  # local TPS: Boot's
    assert cfg["data"]["n_samples"] == 4 + 6  # 4 of toy_a's 8 normal training images, all 6 of toy_b
    with pytest.raises(ValueError, match="unknown anomalyfactory.boot config key"):
        run_boot(data["index"], data["manifest"], tmp_path / "x", tmp_path / "x.csv", tmp_path / "s", tmp_path / "w",
                 ah_model, TRAIN, {"epoch": 3}, {})


def test_training_pairs_are_edited_with_one_opencv_thread_and_the_callers_count_comes_back(tmp_path, monkeypatch,
                                                                                            callers_opencv_threads):
    """A pair's OpenCV calls (the reference's warp, blob noise) come one at a time between numpy work;
    OpenCV's pool then spins between them (a fifth more CPU per pair, and slower), so Flare's training
    pairs are edited on one thread and the caller's count comes back after the stage."""
    import cv2

    import hybrid.stages.flare as flare_stage

    real, counts = flare_stage.local_anomaly, []

    def local_anomaly(*args, **kwargs):
        counts.append(cv2.getNumThreads())
        return real(*args, **kwargs)

    monkeypatch.setattr(flare_stage, "local_anomaly", local_anomaly)
    data = make_results(tmp_path)
    boot = save_af_checkpoint(tmp_path / "boot", "boot")
    flare_run(data, boot, tmp_path / "a")
    assert cv2.getNumThreads() == callers_opencv_threads
    assert counts and set(counts) == {1}
