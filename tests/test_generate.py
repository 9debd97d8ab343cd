import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage

from hybrid.checkpoint import save_checkpoint
from hybrid.cli import add_generate_cli as add_cli
from hybrid.data.manifest import make_manifest
from hybrid.data.shards import build_index, write_shard
from hybrid.manipulate import ManipulateConfig
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator
from hybrid.pipeline import generate_batch, load_generator
from hybrid.planning import PairingConfig, pair_samples, plan_jobs
from hybrid.stages.generate import MANIFEST_COLUMNS, GenerateConfig, Samples
from hybrid.stages.generate import run as generate

S = 32
TINY = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def scene(rng: np.random.Generator, colour: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An ellipse on a grey background, in [-1, 1]: colour shaded by nearness, dark rim = edges."""
    yy, xx = np.mgrid[0:S, 0:S]
    cx, cy = rng.uniform(10, 22, 2)
    rx, ry = rng.uniform(6, 11, 2)
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    near = np.where(d < 1, 1 - d, 0.0)
    edge = np.where(np.abs(d - 1) < 0.12, 1.0, -1.0)
    colour = rng.uniform(-0.6, 0.9, 3) if colour is None else colour
    image = np.where(d[None] < 1, colour[:, None, None] * (0.4 + 0.6 * near[None]), -0.8)
    image = np.where(edge[None] > 0, -1.0, image)
    return {"image": image, "depth": near * 2 - 1, "edge": edge}, colour


def as_tensors(s: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32)[None] if v.ndim == 2 else torch.tensor(v, dtype=torch.float32)
            for k, v in s.items()}


def make_dataset(root, per_category: int = 4, categories=("bottle", "nut")):
    """Two input shards of scenes (uint8/uint16 as preprocess stores them) and a manifest."""
    rng = np.random.default_rng(0)
    rows, samples = [], []
    for c in categories:
        for i in range(per_category):
            s, _ = scene(rng)
            sid = f"{c}-{i}"
            samples.append((sid, s))
            rows.append({"sample_id": sid, "dataset": "test", "category": c, "split": "train", "label": 0,
                         "subspecies": "8" if i % 2 == 0 else "9", "image_path": f"/data/{sid}.png"})
    rows.append({"sample_id": "bottle-test", "dataset": "test", "category": "bottle", "split": "test", "label": 1,
                 "image_path": "/data/x.png"})
    samples.append(("bottle-test", scene(rng)[0]))
    shard_dir = root / "shards"
    paths = []
    for k, part in enumerate((samples[:5], samples[5:])):
        arrays = {
            "image": np.stack([((s["image"].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
                               for _, s in part]),
            "edge": np.stack([((s["edge"] + 1) * 127.5).round().astype(np.uint8) for _, s in part]),
            "depth": np.stack([((s["depth"] + 1) * 32767.5).round().astype(np.uint16) for _, s in part]),
        }
        paths.append(shard_dir / f"shard-{k:05d}.h5")
        write_shard(paths[-1], arrays, {"sample_id": [sid for sid, _ in part]},
                    {"resolution": S, "edge_model": "canny", "depth_source": "dataset"})
    build_index(paths).to_parquet(shard_dir / "index.parquet")
    return shard_dir / "index.parquet", make_manifest(rows, "test")


def save_tiny_checkpoint(path, G: Generator | None = None, data: dict | None = None, seed: int = 0):
    """A checkpoint directory written the way hybrid.train writes it."""
    torch.manual_seed(seed)
    G = G or Generator(**TINY)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, ndf=4, n_layers=2, num_D=1)
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    config = {"model": G.config, "discriminator": D.config, **({"data": data} if data else {})}
    save_checkpoint(path, G, D, opt_G, opt_D, config, {"step": 0, "epoch": 0, "lr": 0.0, "seed": seed})
    return path


def small_cfg(**kw) -> GenerateConfig:
    d = {"global": {"count": 3}, "local": {"count": 3, "match": ["subspecies"]}, "normal": {"count": 2},
         "batch_size": 2, "shard_size": 4, "device": "cpu", "sheet_rows": 2,
         "manipulate": {"area": [0.03, 0.06]}}
    d.update(kw)
    return GenerateConfig.from_dict(d)


def shard_arrays(out_dir) -> dict[str, dict[str, np.ndarray]]:
    res = {}
    for p in sorted(out_dir.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            res[p.name] = {k: f[k][:] for k in f}
    return res


# ----------------------------------------------------------------------------- pairs
def rows_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(8)],
        "category": ["erato"] * 6 + ["other"] * 2,
        "subspecies": ["8", "8", "8", "9", "9", "1", "8", "9"],
    })


def test_explicit_pairs_are_kept_in_order_with_the_target_category():
    cfg = PairingConfig(pairing="explicit", pairs=[["s7", "s0"], ["s0", "s6"]])
    assert pair_samples(rows_frame(), cfg, seed=0) == [("s7", "s0", "erato"), ("s0", "s6", "other")]
    with pytest.raises(ValueError, match="nope"):
        pair_samples(rows_frame(), PairingConfig(pairing="explicit", pairs=[["s0", "nope"]]), seed=0)


def test_group_pairs_take_every_pair_between_the_groups_in_both_directions():
    rows = rows_frame()
    cfg = PairingConfig(pairing="groups", groups=[[{"subspecies": 8}, {"subspecies": ["9"]}]], count=100)
    pairs = pair_samples(rows, cfg, seed=0)
    a, b = ["s0", "s1", "s2", "s6"], ["s3", "s4", "s7"]
    both = [(x, y) for x in a for y in b] + [(y, x) for x in a for y in b]
    assert sorted((r, t) for r, t, _ in pairs) == sorted(both)
    assert all(c == rows.set_index("sample_id").loc[t, "category"] for _, t, c in pairs)
    one_way = pair_samples(rows, PairingConfig(pairing="groups", groups=cfg.groups, count=100,
                                               both_directions=False), seed=0)
    assert sorted((r, t) for r, t, _ in one_way) == sorted((x, y) for x in a for y in b)
    capped = pair_samples(rows, PairingConfig(pairing="groups", groups=cfg.groups, count=4), seed=0)
    assert [c for *_, c in capped].count("erato") == 4 and [c for *_, c in capped].count("other") == 4
    assert set(capped) <= set(pairs)
    with pytest.raises(ValueError, match="matches no selected sample"):
        pair_samples(rows, PairingConfig(pairing="groups", groups=[[{"subspecies": "3"}, {"subspecies": "9"}]]), 0)


def test_random_pairs_stay_within_category_and_match_columns_and_are_seeded():
    rows = rows_frame()
    info = rows.set_index("sample_id")
    pairs = pair_samples(rows, PairingConfig(count=20, match=["subspecies"]), seed=1)
    assert len(pairs) == 20  # "other" has no two samples of one subspecies, so all pairs are erato
    for r, t, c in pairs:
        assert r != t and info.loc[r, "category"] == info.loc[t, "category"] == c
        assert info.loc[r, "subspecies"] == info.loc[t, "subspecies"]
    across = pair_samples(rows, PairingConfig(count=20), seed=1)
    assert {c for *_, c in across} == {"erato", "other"}
    assert any(info.loc[r, "subspecies"] != info.loc[t, "subspecies"] for r, t, _ in across)
    assert pair_samples(rows, PairingConfig(count=20), seed=1) == across
    assert pair_samples(rows, PairingConfig(count=20), seed=2) != across


def test_plan_draws_manipulations_for_local_pairs_only_and_selects_rows():
    rows = rows_frame().assign(split=["train"] * 7 + ["test"], label=0)
    cfg = GenerateConfig.from_dict({"seed": 3, "select": {"split": "train"}, "local": {"count": 24},
                                    "global": {"count": 2}, "normal": {"count": 1}})
    jobs = plan_jobs(rows, cfg)  # "other" keeps one train sample: no random pairs there
    assert [j.kind for j in jobs] == ["global"] * 2 + ["local"] * 24 + ["normal"]
    assert all(j.manipulation == "none" for j in jobs if j.kind != "local")
    assert {j.manipulation for j in jobs if j.kind == "local"} == {"merge", "remove", "replace", "tps"}
    assert "s7" not in {x for j in jobs for x in (j.reference_id, j.target_id)}  # a test-split sample
    assert len({j.pair_id for j in jobs}) == len(jobs) and len({j.seed for j in jobs}) == len(jobs)
    assert plan_jobs(rows, cfg) == jobs


def test_config_errors_name_the_bad_key():
    with pytest.raises(ValueError, match="unknown generate config key"):
        GenerateConfig.from_dict({"count": 3})
    with pytest.raises(ValueError, match="unknown generate.local config key"):
        GenerateConfig.from_dict({"local": {"manipulations": ["tps"]}})
    with pytest.raises(ValueError, match="'smash'.*merge, remove, replace, tps"):
        GenerateConfig.from_dict({"manipulate": {"manipulations": ["smash"]}})
    with pytest.raises(ValueError, match="pairing 'groups' needs groups"):
        GenerateConfig.from_dict({"global": {"pairing": "groups"}})


# ----------------------------------------------------------------------------- the stage
def test_stage_writes_shards_manifest_and_contact_sheets(tmp_path):
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "generated"
    df = generate(ckpt, index, manifest, out, small_cfg())
    assert list(df.columns) == MANIFEST_COLUMNS
    pd.testing.assert_frame_equal(df, pd.read_parquet(out / "manifest.parquet"))
    counts = df.groupby(["category", "kind", "decoder"]).size()
    assert counts.to_dict() == {(c, k, d): n for c in ("bottle", "nut") for k, n in
                                (("global", 3), ("local", 3), ("normal", 2)) for d in ("AHD", "AHE")}
    assert df["sample_id"].is_unique and "bottle-test" not in set(df["reference_id"]) | set(df["target_id"])
    assert df["label"].tolist() == [int(k != "normal") for k in df["kind"]]
    assert set(df.loc[df["kind"] == "local", "manipulation"]) <= {"merge", "remove", "replace", "tps"}
    assert (df.loc[df["kind"] != "local", "manipulation"] == "none").all()
    arrays = shard_arrays(out)
    assert len(arrays) == 8  # 16 pairs, 2 per shard of 4 images
    for row in df.itertuples():
        a = arrays[row.shard]
        assert a["sample_id"][row.index].decode() == row.sample_id
        assert a["decoder"][row.index].decode() == row.decoder
        region = a["region"][row.index]
        assert set(np.unique(region)) <= {0, 255}
        assert region.any() == (row.kind == "local")
    first = arrays["shard-00000.h5"]
    assert first["image"].dtype == np.uint8 and first["image"].shape == (4, S, S, 3)
    assert first["mask"].dtype == np.uint8 and first["mask"].shape == (4, S, S)
    assert first["depth"].dtype == np.uint16 and first["edge"].dtype == np.uint8
    for c in ("bottle", "nut"):
        sheet = np.asarray(Image.open(out / "sheets" / f"{c}.png"))
        assert sheet.ndim == 3 and sheet.shape[0] > 6 * S  # 2 pairs of each of 3 kinds
    # a stored output is what the generator gives for its pair: fused image and M x 255
    row = df[(df["kind"] == "local")].iloc[0]
    G = load_generator(ckpt, torch.device("cpu"))
    inputs = Samples(pd.read_parquet(index), index.parent)
    job = next(j for j in plan_jobs(manifest, small_cfg()) if j.pair_id == row["pair_id"])
    res = generate_batch(G, [inputs[job.reference_id]], [inputs[job.target_id]], [job.manipulation], [job.seed],
                         small_cfg().manipulate)
    a = arrays[row["shard"]]
    d = row["decoder"]
    expect = ((res[d]["image"][0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(a["image"][row["index"]], expect)
    np.testing.assert_array_equal(a["mask"][row["index"]], (res[d]["mask"][0, 0] * 255).round().to(torch.uint8).numpy())
    np.testing.assert_array_equal(a["region"][row["index"]] > 0, res["region"][0, 0].numpy())


def test_stage_is_deterministic_and_resumes_only_missing_or_stale_shards(tmp_path):
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    a, b = tmp_path / "a", tmp_path / "b"
    generate(ckpt, index, manifest, a, small_cfg())
    generate(ckpt, index, manifest, b, small_cfg(batch_size=3, workers=1))  # other batches, a worker process
    first, second = shard_arrays(a), shard_arrays(b)
    assert first.keys() == second.keys()
    for name in first:
        for k in first[name]:
            np.testing.assert_array_equal(first[name][k], second[name][k], err_msg=f"{name} {k}")

    stamps = {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*.h5")}
    generate(ckpt, index, manifest, a, small_cfg())
    assert {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*.h5")} == stamps  # all kept
    (a / "shard-00003.h5").unlink()
    (a / "shard-00005.h5").write_bytes(b"truncated by a crash")
    generate(ckpt, index, manifest, a, small_cfg())
    now = {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*.h5")}
    assert {n for n in now if now[n] != stamps[n]} == {"shard-00003.h5", "shard-00005.h5"}
    again = shard_arrays(a)
    for k in first["shard-00003.h5"]:
        np.testing.assert_array_equal(again["shard-00003.h5"][k], first["shard-00003.h5"][k])
        np.testing.assert_array_equal(again["shard-00005.h5"][k], first["shard-00005.h5"][k])

    generate(ckpt, index, manifest, a, small_cfg(manipulate={"area": [0.1, 0.2]}))  # new settings: all rewritten
    assert all(p.stat().st_mtime_ns != now[p.name] for p in a.glob("shard-*.h5"))
    generate(ckpt, index, manifest, a, small_cfg(kinds=["global"]))  # fewer shards: stale ones go
    assert sorted(p.name for p in a.glob("shard-*.h5")) == [f"shard-{i:05d}.h5" for i in range(3)]
    assert set(pd.read_parquet(a / "manifest.parquet")["kind"]) == {"global"}


def test_a_run_that_fails_mid_shard_leaves_its_finished_shards_and_no_partial_file(tmp_path, monkeypatch):
    """Shards are streamed into their file a batch at a time: a failure half way through one (here the
    sixth batch, inside the third shard) removes that shard's temporary file; the two finished shards
    stay and a rerun writes only the rest, with the arrays of an uninterrupted run. (Batches of one
    pair, two pairs per shard: the sixth batch is the third shard's second.)"""
    import hybrid.pipeline as pipeline

    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cfg = small_cfg(batch_size=1)
    generate(ckpt, index, manifest, tmp_path / "whole", cfg)
    real, calls = pipeline.HybridPipeline.encode, []

    def failing(self, batch):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("the device fell over")
        return real(self, batch)

    monkeypatch.setattr(pipeline.HybridPipeline, "encode", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="fell over"):
        generate(ckpt, index, manifest, out, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.h5", "shard-00001.h5"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    monkeypatch.setattr(pipeline.HybridPipeline, "encode", real)
    generate(ckpt, index, manifest, out, cfg)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01].h5")} == stamps
    whole, again = shard_arrays(tmp_path / "whole"), shard_arrays(out)
    assert whole.keys() == again.keys()
    for name in whole:
        for k in whole[name]:
            np.testing.assert_array_equal(again[name][k], whole[name][k], err_msg=f"{name} {k}")


# ----------------------------------------------------------------------------- a generator that learnt
def train_tiny_generator(steps: int = 250) -> Generator:
    """A tiny generator taught (L1, both decoders) to draw the target's scene in the reference's colour."""
    torch.manual_seed(0)
    G = Generator(ngf=8, n_downsample=2, n_blocks=1)
    opt = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        refs, tgts = [], []
        for _ in range(8):
            t, colour = scene(rng)
            tgts.append(as_tensors(t))
            refs.append(as_tensors(scene(rng, colour)[0]))
        maps = {"reference_image": torch.stack([r["image"] for r in refs]),
                "target_depth": torch.stack([t["depth"] for t in tgts]),
                "target_edge": torch.stack([t["edge"] for t in tgts])}
        target = torch.stack([t["image"] for t in tgts])
        out = G(G.inputs(maps))
        loss = sum((o["image"] - target).abs().mean() for o in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return G.eval()


def test_local_anomaly_changes_the_region_and_leaves_far_pixels_nearly_unchanged():
    G = train_tiny_generator()
    cfg = ManipulateConfig(object_aware=1.0, area=(0.04, 0.06), regions=(1, 1), reference_shift=0.0)
    rng = np.random.default_rng(5)
    inside, far = [], []
    for k in range(4):
        t, colour = scene(rng)
        r = scene(rng, colour)[0]
        ref, tgt = as_tensors(r), as_tensors(t)
        plain = generate_batch(G, [ref], [tgt], ["none"], [k], cfg)
        edited = generate_batch(G, [ref], [tgt], ["remove"], [k], cfg)
        region = edited["region"][0, 0].numpy()
        assert region.any() and not plain["region"].any()
        away = ndimage.distance_transform_edt(~region) > 6
        for d in ("AHD", "AHE"):
            diff = (plain[d]["image"] - edited[d]["image"]).abs().mean(1)[0].numpy()
            inside.append(diff[region].mean())
            far.append(diff[away].mean())
            assert diff[region].mean() > 4 * diff[away].mean()
    assert np.mean(inside) > 0.1 and np.mean(far) < 0.02


# ----------------------------------------------------------------------------- the command
def test_cli_generates_from_two_pngs(tmp_path, model_dir):
    import argparse

    from tests.tiny_models import save_tiny_depth_anything

    save_tiny_depth_anything(model_dir / "depth_anything" / "Depth-Anything-V2-Small-hf")
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", data={"resolution": S})  # edge/depth: the defaults
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        s, _ = scene(rng)
        Image.fromarray(((s["image"].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)).resize((48, 40)).save(
            tmp_path / f"{name}.png")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--checkpoint", str(ckpt), "--reference", str(tmp_path / "a.png"),
                              "--target", str(tmp_path / "b.png"), "--manipulation", "remove", "--seed", "3",
                              "--out", str(tmp_path / "out"), "--device", "cpu"])
    args.func(args)
    out = tmp_path / "out"
    names = {"AHD", "AHE", "AHD_mask", "AHE_mask", "region", "target_edge", "target_depth", "sheet"}
    assert {p.stem for p in out.glob("*.png")} == names
    for n in names - {"sheet"}:
        assert np.asarray(Image.open(out / f"{n}.png")).shape[:2] == (S, S)
    assert np.asarray(Image.open(out / "region.png")).any()
    first = np.asarray(Image.open(out / "AHD.png")).copy()
    args.func(args)  # same seed, same output
    np.testing.assert_array_equal(np.asarray(Image.open(out / "AHD.png")), first)
    bad = parser.parse_args(["generate", "--checkpoint", str(ckpt), "--reference", str(tmp_path / "a.png"),
                             "--target", str(tmp_path / "b.png"), "--manipulation", "smash", "--out", str(out)])
    with pytest.raises(ValueError, match="'smash'.*merge, remove, replace, tps"):
        bad.func(bad)
    json.loads((ckpt / "config.json").read_text())  # the checkpoint is read, not rewritten


# ----------------------------------------------------------------------------- AH* and noise
def test_depth_level_checkpoint_adds_aligned_depth_and_edge_anomalies(tmp_path):
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    star = save_tiny_checkpoint(tmp_path / "star", Generator(level="depth", **TINY), data={"depth_field": "depth"},
                                seed=1)
    with pytest.raises(ValueError, match=r"depth-level \(AnomalyHybrid\*\) generator, but generate's checkpoint"):
        generate(star, index, manifest, tmp_path / "x", small_cfg())
    with pytest.raises(ValueError, match=r"rgb-level \(AnomalyHybrid\) generator, but generate's depth-level"):
        generate(ckpt, index, manifest, tmp_path / "x", small_cfg(), depth_checkpoint=ckpt)
    out = tmp_path / "generated"
    df = generate(ckpt, index, manifest, out, small_cfg(), depth_checkpoint=star)
    arrays = shard_arrays(out)
    first = arrays["shard-00000.h5"]
    assert first["depth_generated"].dtype == np.uint16 and first["depth_generated"].shape == (4, S, S)
    assert first["edge_generated"].dtype == np.uint8 and first["edge_generated"].shape == (4, S, S)
    # each depth-level output is AH* on that very RGB image, with the target's unmanipulated maps
    G_star = load_generator(star, torch.device("cpu"), "depth")
    inputs = Samples(pd.read_parquet(index), index.parent)
    for row in df[df["kind"] == "local"].head(2).itertuples():
        a = arrays[row.shard]
        image = torch.from_numpy(a["image"][row.index]).permute(2, 0, 1)[None].float() / 127.5 - 1
        target = inputs[row.target_id]
        with torch.no_grad():
            o = G_star(G_star.inputs({"target_image": image, "reference_depth": target["depth"][None],
                                      "reference_edge": target["edge"][None]}))
        depth = (a["depth_generated"][row.index].astype(np.float64) / 32767.5 - 1)
        edge = (a["edge_generated"][row.index].astype(np.float64) / 127.5 - 1)
        # the stored RGB image is uint8-rounded; AH* saw the float image: small differences only
        assert np.abs(depth - o["AHD"]["image"][0, 0].numpy()).mean() < 0.02
        assert np.abs(edge - o["AHE"]["image"][0, 0].numpy()).mean() < 0.02


def test_feature_noise_is_drawn_from_the_pair_seed(tmp_path):
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cfg = {"kinds": ["global"], "global": {"count": 2}}
    plain = shard_arrays_of(generate(ckpt, index, manifest, tmp_path / "plain", small_cfg(**cfg)), tmp_path / "plain")
    a = shard_arrays_of(generate(ckpt, index, manifest, tmp_path / "a", small_cfg(**cfg, feature_noise=0.5)),
                        tmp_path / "a")
    b = shard_arrays_of(generate(ckpt, index, manifest, tmp_path / "b",
                                 small_cfg(**cfg, feature_noise=0.5, batch_size=3)), tmp_path / "b")
    c = shard_arrays_of(generate(ckpt, index, manifest, tmp_path / "c", small_cfg(**cfg, feature_noise=0.5, seed=9)),
                        tmp_path / "c")
    np.testing.assert_array_equal(a, b)  # one seed: the same images, whatever the batch
    assert np.abs(a.astype(int) - plain.astype(int)).mean() > 0.5  # the noise changes the outputs
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 0.5  # another seed, other noise (and pairs)
    G = load_generator(ckpt, torch.device("cpu"))
    from hybrid.pipeline import feature_noise

    n1, n2 = feature_noise(G, 5, 0.5, S, S), feature_noise(G, 6, 0.5, S, S)
    assert n1.shape == G.feature_shape(S, S) and torch.equal(n1, feature_noise(G, 5, 0.5, S, S))
    assert not torch.equal(n1, n2) and abs(float(n1.std()) - 0.5) < 0.05


def test_the_pair_dataset_sent_to_workers_carries_no_generator(tmp_path):
    """DataLoader workers started by spawn or forkserver (macOS, Python 3.14) receive the dataset
    pickled: it must not carry the generator's weights (800 MB at paper size), noise or not."""
    import pickle

    from hybrid.pipeline import feature_noise
    from hybrid.stages.generate import PairConditions

    index, manifest = make_dataset(tmp_path)
    G = load_generator(save_tiny_checkpoint(tmp_path / "ckpt"), torch.device("cpu"))
    cfg = small_cfg(feature_noise=0.5)
    jobs = plan_jobs(manifest, cfg)
    samples = Samples(pd.read_parquet(index), index.parent)
    data = PairConditions(jobs, samples, cfg.manipulate, G, cfg.feature_noise)
    blob = pickle.dumps(data)
    assert b"Generator" not in blob and len(blob) < sum(p.numel() for p in G.parameters())
    j = jobs[0]
    expect = feature_noise(G, j.seed, 0.5, S, S)
    assert torch.equal(pickle.loads(blob)[0]["feature_noise"], expect)


def shard_arrays_of(df: pd.DataFrame, out) -> np.ndarray:
    arrays = shard_arrays(out)
    return np.stack([arrays[r.shard]["image"][r.index] for r in df.sort_values("sample_id").itertuples()])


# ----------------------------------------------------------------------------- industrial protocol
def make_defect_dataset(root):
    """Base-set anomalies of two defect types per category, with real masks in the shards."""
    rng = np.random.default_rng(3)
    rows, images, edges, depths, masks, ids = [], [], [], [], [], []
    for c in ("bottle", "nut"):
        for defect, n in (("crack", 3), ("hole", 1)):
            for i in range(n):
                s, _ = scene(rng)
                m = np.zeros((S, S), np.uint8)
                y, x = rng.integers(6, 20, 2)
                m[y:y + 6, x:x + 8] = 255
                sid = f"{c}/test/{defect}/{i:03d}"
                rows.append({"sample_id": sid, "dataset": "test", "category": c, "split": "test", "label": 1,
                             "defect": defect, "image_path": f"/data/{sid}.png", "mask_path": f"/data/{sid}_mask.png"})
                ids.append(sid)
                images.append(((s["image"].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8))
                edges.append(((s["edge"] + 1) * 127.5).round().astype(np.uint8))
                depths.append(((s["depth"] + 1) * 32767.5).round().astype(np.uint16))
                masks.append(m)
    shard_dir = root / "shards"
    write_shard(shard_dir / "shard-00000.h5", {"image": np.stack(images), "edge": np.stack(edges),
                                               "depth": np.stack(depths), "mask": np.stack(masks)},
                {"sample_id": ids, "has_mask": ["1"] * len(ids)}, {"resolution": S})
    build_index([shard_dir / "shard-00000.h5"]).to_parquet(shard_dir / "index.parquet")
    manifest = make_manifest(rows, "test").assign(protocol="base")
    return shard_dir / "index.parquet", manifest, dict(zip(ids, masks))


def test_base_source_pairs_one_defect_type_and_takes_the_region_from_the_real_masks(tmp_path):
    from hybrid.manipulate import mask_region

    index, manifest, masks = make_defect_dataset(tmp_path)
    cfg = small_cfg(kinds=["local"], local={"count": 5, "source": "base"}, manipulate={"mask_dilation": 1})
    jobs = plan_jobs(manifest, cfg)
    assert [(j.category, j.defect) for j in jobs] == [(c, d) for c in ("bottle", "nut")
                                                      for d in ("crack", "hole", "crack", "hole", "crack")]
    for j in jobs:
        assert j.reference_id.split("/")[2] == j.target_id.split("/")[2] == j.defect
        assert (j.reference_id != j.target_id) == (j.defect == "crack")  # a lone hole pairs with itself
    df = generate(save_tiny_checkpoint(tmp_path / "ckpt"), index, manifest, tmp_path / "gen", cfg)
    assert df["defect"].tolist() == [j.defect for j in jobs for _ in ("AHD", "AHE")]
    arrays = shard_arrays(tmp_path / "gen")
    for j in jobs:
        row = df[(df["pair_id"] == j.pair_id) & (df["decoder"] == "AHD")].iloc[0]
        region = arrays[row["shard"]]["region"][row["index"]] > 0
        expect, _ = mask_region(masks[j.target_id] > 0, masks[j.reference_id] > 0, np.random.default_rng(j.seed),
                                cfg.manipulate)
        np.testing.assert_array_equal(region, expect)
        assert region[masks[j.target_id] > 0].all()  # the target's own defect is always covered
    with pytest.raises(ValueError, match="source: base needs base-set anomalies"):
        plan_jobs(manifest.drop(columns="protocol"), cfg)
