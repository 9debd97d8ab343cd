"""The entry point (HybridPipeline), the generator's own checkpoint I/O and the module boundaries
that keep generation apart from training; and that a failed rerun keeps the last complete shard set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import hybrid.stages.generate as gen_stage
import hybrid.stages.preprocess as pp
from hybrid.data.shards import KEPT, ShardDataset
from hybrid.models.generator import Generator
from hybrid.pipeline import HybridOutput, HybridPipeline, generate_one
from tests.test_generate import TINY, S, make_dataset, save_tiny_checkpoint, scene, small_cfg
from tests.test_preprocess import _cfg, _manifest

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = {"resolution": S, "fit": "stretch", "edge_model": "canny", "depth_source": "dataset"}


def _images(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [((scene(rng)[0]["image"].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8) for _ in range(2)]


def test_pipeline_takes_arrays_paths_or_pil_and_returns_each_decoders_outputs(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", data=DATA)
    pipe = HybridPipeline.from_pretrained(ckpt, device="cpu")
    assert pipe.decoders == ["AHD", "AHE"] and pipe.needs == {"edge", "depth"}
    ref, tgt = _images()
    paths = []
    for name, a in (("ref", ref), ("tgt", tgt)):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(a).save(paths[-1])
    outs = [pipe(ref, tgt, "remove", seed=3, depth_source="flat"),
            pipe(*paths, "remove", seed=3, depth_source="flat"),
            pipe(Image.fromarray(ref), Image.open(paths[1]), "remove", seed=3, depth_source="flat")]
    for out in outs:
        assert isinstance(out, HybridOutput) and out.manipulation == "remove"
        assert set(out.images) == set(out.masks) == {"AHD", "AHE"}
        assert out.images["AHE"].shape == (S, S, 3) and out.images["AHE"].dtype == np.uint8
        assert out.masks["AHD"].shape == (S, S) and out.region.dtype == bool and out.region.any()
        assert set(out.fed) == {"target_edge", "target_depth"}
        np.testing.assert_array_equal(out.images["AHE"], outs[0].images["AHE"])
    other = pipe(ref, tgt, "remove", seed=4, depth_source="flat")
    assert not np.array_equal(other.region, outs[0].region)  # the seed draws the region
    glob = pipe(ref, tgt, depth_source="flat")
    assert not glob.region.any() and glob.manipulation == "none"
    assert not np.array_equal(glob.images["AHD"], glob.images["AHE"])  # two decoders, two outputs


def test_pipeline_asks_for_depth_it_cannot_compute_and_refuses_bad_arrays(tmp_path):
    pipe = HybridPipeline.from_pretrained(save_tiny_checkpoint(tmp_path / "ckpt", data=DATA), device="cpu")
    ref, tgt = _images()
    with pytest.raises(ValueError, match="depth files.*--depth-source"):
        pipe(ref, tgt)  # trained on dataset depth; no depth files given
    with pytest.raises(ValueError, match="uint8"):
        pipe(ref.astype(np.float32), tgt, depth_source="flat")
    edge_only = Generator(conditions=["reference_image", "target_edge"], decoders=["AHE"], **TINY)
    pipe = HybridPipeline.from_pretrained(save_tiny_checkpoint(tmp_path / "af", edge_only, data=DATA), device="cpu")
    out = pipe(ref, tgt, "random", seed=2)  # needs no depth at all
    assert list(out.images) == ["AHE"] and set(out.fed) == {"target_edge"}


def test_hybrid_generate_is_the_pipeline_saved_to_pngs(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", data=DATA)
    ref, tgt = _images()
    for name, a in (("ref", ref), ("tgt", tgt)):
        Image.fromarray(a).save(tmp_path / f"{name}.png")
    files = generate_one(ckpt, tmp_path / "ref.png", tmp_path / "tgt.png", tmp_path / "out", "merge", 5,
                         depth_source="flat", device="cpu")
    out = HybridPipeline.from_pretrained(ckpt, device="cpu")(tmp_path / "ref.png", tmp_path / "tgt.png", "merge", 5,
                                                            depth_source="flat")
    for name, a in out.files().items():
        np.testing.assert_array_equal(np.asarray(Image.open(files[name])), a)
    assert "sheet" in files


def test_save_pretrained_round_trips_and_writes_a_model_card(tmp_path):
    torch.manual_seed(0)
    G = Generator(level="depth", **TINY)
    G.save_pretrained(tmp_path / "g", {"data": {"n_samples": 12, "resolution": 64, "edge_model": "canny"},
                                        "step": 40, "epoch": 2})
    H = Generator.from_pretrained(tmp_path / "g", level="depth")
    for (k, a), (_, b) in zip(G.state_dict().items(), H.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["model"] == G.config and config["step"] == 40
    card = (tmp_path / "g" / "README.md").read_text()
    assert "depth-level" in card and "12 samples" in card and "40 steps over 3 epochs" in card
    assert "settings hash" in card
    with pytest.raises(ValueError, match="needs a rgb-level"):
        Generator.from_pretrained(tmp_path / "g", level="rgb", purpose="generation")
    (tmp_path / "g" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="damaged"):
        Generator.from_pretrained(tmp_path / "g")


def test_generation_and_planning_never_import_training():
    code = ("import sys, hybrid.pipeline, hybrid.stages.generate; "
            "bad = [m for m in ('hybrid.train', 'hybrid.checkpoint', 'hybrid.losses', "
            "'hybrid.models.discriminator', 'hybrid.models.vgg') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    planning = "import sys, hybrid.planning; assert 'torch' not in sys.modules, 'planning imports torch'"
    subprocess.run([sys.executable, "-c", planning], check=True)


def _arrays(out_dir, names) -> dict[str, np.ndarray]:
    ds = ShardDataset(pd.read_parquet(out_dir / names[0]), fields=("image",), shard_dir=out_dir, raw=True)
    return {ds.index["sample_id"].iloc[i]: ds[i]["image"] for i in range(len(ds))}


def test_a_failed_rerun_keeps_the_last_complete_shard_set_and_says_where(tmp_path, monkeypatch):
    m, out = _manifest(tmp_path), tmp_path / "out"
    pp.run(m, out, _cfg())
    before = pd.read_parquet(out / "index.parquet")
    images = _arrays(out, ["index.parquet"])
    calls = {"n": 0}
    real = pp._flush

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk gone")
        return real(*args, **kw)

    monkeypatch.setattr(pp, "_flush", dying)
    (out / "index.parquet").unlink()  # Snakemake removes the output of the job it reruns
    with pytest.raises(OSError) as e:
        pp.run(m, out, _cfg(resolution=12))  # changed settings: the first shard is rewritten, then it fails
    assert str(out / KEPT) in "\n".join(e.value.__notes__)
    kept = out / KEPT
    assert pd.read_parquet(kept / "index.parquet").equals(before)
    again = _arrays(kept, ["index.parquet"])
    assert all(np.array_equal(images[k], again[k]) for k in images)  # the old 16 px set, whole
    monkeypatch.setattr(pp, "_flush", real)
    pp.run(m, out, _cfg(resolution=12))
    assert _arrays(out / KEPT, ["index.parquet"])["s0"].shape[:2] == (12, 12)  # the new set is the kept one now


def test_a_failed_generate_rerun_keeps_the_last_generated_set(tmp_path, monkeypatch):
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "gen"
    first = gen_stage.run(ckpt, index, manifest, out, small_cfg())
    real = gen_stage._Shard.close
    calls = {"n": 0}

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("quota exceeded")
        return real(self)

    monkeypatch.setattr(gen_stage._Shard, "close", dying)
    (out / "manifest.parquet").unlink()
    with pytest.raises(OSError) as e:
        gen_stage.run(ckpt, index, manifest, out, small_cfg(manipulate={"area": [0.1, 0.2]}))
    assert "generate" in e.value.__notes__[0] and str(out / KEPT) in e.value.__notes__[0]
    kept = pd.read_parquet(out / KEPT / "manifest.parquet")
    assert kept.equals(first) and all((out / KEPT / s).exists() for s in kept["shard"].unique())
    assert os.stat(out / KEPT / kept["shard"].iloc[0]).st_nlink >= 1
