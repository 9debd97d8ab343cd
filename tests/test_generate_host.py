"""The generate stage's fast host path writes the very contents of the plain per-pair path.

The stage converts outputs on the device, reads pairs through one DataLoader for all shards and
streams each batch into its shard's file from a background thread. ``reference_shards`` below is
the plain path it replaced (one pair and one decoder at a time, a DataLoader per shard, then
``np.stack`` and one ``write_shard``), kept here as the definition of the outputs: every shard
must hold the same arrays (values, dtypes, shapes), strings and attributes. (The files' bytes
differ: HDF5 places the chunks in the order they are written.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from hybrid.data.shards import read_attrs, shard_name, to_unit, write_shard
from hybrid.models.generator import Generator
from hybrid.pipeline import add_depth_level, load_generator, run_generator
from hybrid.planning import plan_jobs
from hybrid.stages.generate import _STRINGS, PairConditions, Samples
from hybrid.stages.generate import run as generate
from tests.compile_doubles import Broken, Recorder
from tests.test_generate import TINY, make_dataset, save_tiny_checkpoint, shard_arrays, small_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _depth_uint16(x: torch.Tensor) -> np.ndarray:
    return ((x[:, 0].float().clamp(-1, 1) + 1) * 32767.5).round().to(torch.int32).numpy().astype(np.uint16)


class PlainSamples(Samples):
    """Samples read as before: ShardDataset items, then to_unit."""

    def raw(self, sample_id: str) -> dict:
        return self.data[self.pos[sample_id]]

    def __getitem__(self, sample_id: str) -> dict[str, torch.Tensor]:
        item = self.raw(sample_id)
        out = {k: to_unit(item[k], k) for k in self.data.fields if k in ("image", "edge", "depth")}
        if self.star_depth is not None:
            out["star_depth"] = to_unit(item[self.star_depth], self.star_depth)
        return out


def reference_shards(out: Path, checkpoint: Path, index: Path, manifest: pd.DataFrame, cfg,
                     depth_checkpoint: Path | None = None) -> None:
    """Every shard of a run written the plain way, with the attributes of the stage's own shards."""
    index_df = pd.read_parquet(index)
    rows = manifest.merge(index_df[["sample_id"]], on="sample_id")
    jobs = plan_jobs(rows, cfg)
    G = load_generator(checkpoint, torch.device("cpu"))
    G_star = load_generator(depth_checkpoint, torch.device("cpu"), "depth") if depth_checkpoint else None
    star_depth = None
    if depth_checkpoint is not None:
        star_depth = json.loads((depth_checkpoint / "config.json").read_text()).get("data", {}).get("depth_field",
                                                                                                   "depth")
    samples = PlainSamples(index_df, index.parent, star_depth)
    per_shard = max(1, cfg.shard_size // len(G.decoder_names))
    chunks = [jobs[i:i + per_shard] for i in range(0, len(jobs), per_shard)]
    for i, chunk in enumerate(chunks):
        attrs = {k: v for k, v in read_attrs(index.parent / index_df["shard"].iloc[0]).items()
                 if k in ("resolution", "fit", "edge_model", "depth_source")}
        attrs["checkpoint"] = str(checkpoint)
        if depth_checkpoint is not None:
            attrs["depth_checkpoint"] = str(depth_checkpoint)
        attrs["fingerprint"] = read_attrs(out.parent / "stage" / shard_name(i))["fingerprint"]
        _plain_write_chunk(out / shard_name(i), chunk, G, samples, cfg, attrs, G_star)
    samples.data.close()


def _plain_write_chunk(path, jobs, G, samples, cfg, attrs, G_star) -> None:
    """hybrid.stages.generate's shard writer as it was before the fast path (the reference)."""
    arrays = {k: [] for k in ("image", "mask", "region", "edge", "depth", "depth_generated", "edge_generated")}
    strings = {k: [] for k in _STRINGS}
    loader = torch.utils.data.DataLoader(PairConditions(jobs, samples, cfg.manipulate, G, cfg.feature_noise),
                                         batch_size=cfg.batch_size, num_workers=0)
    done = 0
    for batch in loader:
        out = run_generator(G, batch, "fp32")
        if G_star is not None:
            add_depth_level(G_star, batch, out, "fp32")
        region = batch["region"][:, 0].numpy().astype(np.uint8) * 255
        edge = to_uint8(batch["target_edge"]) if "target_edge" in batch else None
        depth = _depth_uint16(batch["target_depth"]) if "target_depth" in batch else None
        for k, j in enumerate(jobs[done:done + len(region)]):
            for d in G.decoder_names:
                arrays["image"].append(to_uint8(out[d]["image"][k:k + 1])[0])
                arrays["mask"].append((out[d]["mask"][k, 0] * 255).round().to(torch.uint8).numpy())
                arrays["region"].append(region[k])
                if edge is not None:
                    arrays["edge"].append(edge[k])
                if depth is not None:
                    arrays["depth"].append(depth[k])
                if "depth_generated" in out[d]:
                    arrays["depth_generated"].append(_depth_uint16(out[d]["depth_generated"][k:k + 1])[0])
                if "edge_generated" in out[d]:
                    arrays["edge_generated"].append(to_uint8(out[d]["edge_generated"][k:k + 1])[0])
                for key, value in (("sample_id", f"{j.pair_id}-{d}"), ("pair_id", j.pair_id),
                                   ("reference_id", j.reference_id), ("target_id", j.target_id), ("decoder", d),
                                   ("manipulation", j.manipulation), ("category", j.category),
                                   ("defect", j.defect), ("kind", j.kind),
                                   ("reference_dataset", j.reference_dataset)):
                    strings[key].append(value)
        done += len(region)
    write_shard(path, {k: np.stack(v) for k, v in arrays.items() if v}, strings, attrs)


def digests(folder: Path) -> dict[str, dict[str, str]]:
    """Per shard: a digest of each dataset's dtype, shape and values, and of the attributes."""
    out = {}
    for p in sorted(folder.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            d = {k: hashlib.sha256(f"{f[k].dtype}{f[k].shape}".encode() + np.ascontiguousarray(
                f[k].asstr()[:].astype(str) if f[k].dtype.kind == "O" else f[k][:]).tobytes()).hexdigest() for k in f}
            d["attrs"] = json.dumps({k: str(v) for k, v in sorted(f.attrs.items())})
        out[p.name] = d
    return out


@pytest.mark.parametrize("case", [
    {},  # every kind, batches of 2 in shards of 2 pairs
    {"batch_size": 3, "shard_size": 10, "workers": 1},  # batches cut at shard ends, a worker process
    {"kinds": ["local", "normal"], "batch_size": 4, "shard_size": 6, "feature_noise": 0.3},
    {"depth": True, "batch_size": 3, "shard_size": 8},  # AH*: depth_generated and edge_generated
])
def test_stage_shards_hold_the_plain_paths_arrays_strings_and_attributes(tmp_path, case):
    case = dict(case)
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    star = None
    if case.pop("depth", False):
        star = save_tiny_checkpoint(tmp_path / "star", Generator(level="depth", **TINY),
                                    data={"depth_field": "depth"}, seed=1)
    cfg = small_cfg(**case)
    generate(ckpt, index, manifest, tmp_path / "stage", cfg, depth_checkpoint=star)
    (tmp_path / "plain").mkdir()
    reference_shards(tmp_path / "plain", ckpt, index, manifest, cfg, star)
    stage, plain = digests(tmp_path / "stage"), digests(tmp_path / "plain")
    assert len(stage) > 1 and stage == plain


def test_shards_with_edges_not_stored_as_uint8_are_refused_naming_the_file(tmp_path):
    """Global pairs feed the stored edges as they are (uint8 over 255, the float path's values); edges
    stored otherwise (not by this project's preprocess) would be fed differently, so they are refused."""
    index, _ = make_dataset(tmp_path)
    shard = index.parent / "shard-00000.h5"
    with h5py.File(shard, "r+") as f:
        edge = f["edge"][:]
        del f["edge"]
        f.create_dataset("edge", data=edge.astype(np.uint16) * 257, chunks=(1, *edge.shape[1:]))
    with pytest.raises(ValueError, match=r"shard-00000.h5 stores edges as uint16.*rerun"):
        Samples(pd.read_parquet(index), index.parent)


def test_every_stored_value_round_trips_through_the_fed_float_exactly():
    """A local pair's stored maps are the target's own outside the region (only the region's values
    are converted back), which holds because every stored value comes back from its float as itself."""
    from hybrid.pipeline import stored_values

    edges = np.arange(256, dtype=np.uint8).reshape(16, 16)
    depths = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(stored_values(to_unit(edges, "edge")).numpy()[0], edges)
    np.testing.assert_array_equal(stored_values(to_unit(depths, "depth"), depth=True).numpy()[0], depths)


def test_to_unit_in_place_gives_the_values_of_the_plain_formula():
    """to_unit converts on one float copy in place; every stored value must get the float it got
    from the plain ``a.astype(float32) * (2 / scale) - 1`` (and the device's unit_tensor the same)."""
    from hybrid.data.shards import unit_tensor

    for a, scale in ((np.arange(256, dtype=np.uint8).reshape(16, 16), 255.0),
                     (np.arange(65536, dtype=np.uint16).reshape(256, 256), 65535.0)):
        plain = torch.from_numpy(a.astype(np.float32)) * (2.0 / scale) - 1.0
        name = "depth" if a.dtype == np.uint16 else "edge"
        assert torch.equal(to_unit(a, name)[0], plain)
        assert torch.equal(unit_tensor(torch.from_numpy(a.astype(np.int32) if scale > 255 else a)), plain)


@pytest.mark.parametrize("workers", [0, 1])
def test_pairs_are_manipulated_with_one_opencv_thread_and_the_callers_count_comes_back(tmp_path, monkeypatch,
                                                                                       callers_opencv_threads,
                                                                                       workers):
    """OpenCV's thread pool spends more CPU than it saves on per-pair calls at these sizes, so the
    stage runs them on one thread (in the loop's process and in DataLoader workers) and gives the
    caller's OpenCV thread count back afterwards."""
    import cv2

    import hybrid.manipulate as manipulate

    real_warp, seen = manipulate.warp, []

    def warp(*args, **kwargs):
        if cv2.getNumThreads() != 1:  # raised in a worker too: the stage fails
            raise AssertionError(f"a pair's OpenCV call ran with {cv2.getNumThreads()} threads")
        seen.append(1)
        return real_warp(*args, **kwargs)

    monkeypatch.setattr(manipulate, "warp", warp)
    index, manifest = make_dataset(tmp_path)
    generate(save_tiny_checkpoint(tmp_path / "ckpt"), index, manifest, tmp_path / "out",
             small_cfg(kinds=["local"], workers=workers))
    assert cv2.getNumThreads() == callers_opencv_threads
    assert seen or workers  # with no worker the calls ran here


# ----------------------------------------------------------------------------- generate.compile
def test_compiled_generation_writes_the_eager_shards_up_to_float_rounding(tmp_path, caplog):
    """generate.compile runs the generator and AH* through torch.compile (here inductor's CPU
    kernels): the shards hold the same strings and attributes, and the same images, masks and AH*
    maps up to float rounding, across batch sizes (the last batches are smaller)."""
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    star = save_tiny_checkpoint(tmp_path / "star", Generator(level="depth", **TINY), data={"depth_field": "depth"},
                                seed=1)
    generate(ckpt, index, manifest, tmp_path / "eager", small_cfg(batch_size=3, shard_size=8), depth_checkpoint=star)
    with caplog.at_level("INFO"):
        generate(ckpt, index, manifest, tmp_path / "compiled", small_cfg(batch_size=3, shard_size=8, compile=True),
                 depth_checkpoint=star)
    assert "runs through torch.compile" in caplog.text and "torch.compile failed" not in caplog.text
    eager, compiled = shard_arrays(tmp_path / "eager"), shard_arrays(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) > 1
    for shard, arrays in eager.items():
        assert arrays.keys() == compiled[shard].keys()
        assert read_attrs(tmp_path / "eager" / shard) == read_attrs(tmp_path / "compiled" / shard)
        for k, a in arrays.items():
            b = compiled[shard][k]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), k
            if a.dtype.kind == "O":
                assert a.tolist() == b.tolist(), k
            else:  # a level of uint8 (uint16 AH* depth: a few of 65,535) where rounding tips over
                tol = 8 if a.dtype == np.uint16 else 1
                assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= tol, k


def test_a_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog):
    """Where torch.compile cannot build its kernels (no C++ compiler, an unsupported GPU), the call
    fails at the first batch: the stage says so, generates eagerly, and writes the eager shards."""

    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    generate(ckpt, index, manifest, tmp_path / "eager", small_cfg())
    monkeypatch.setattr(torch, "compile", Broken)
    with caplog.at_level("WARNING"):
        generate(ckpt, index, manifest, tmp_path / "fallback", small_cfg(compile=True))
    assert "torch.compile failed (RuntimeError: no C++ compiler here); generating eagerly instead" in caplog.text
    assert digests(tmp_path / "fallback") == digests(tmp_path / "eager")


def test_compiled_generation_pads_a_shards_last_batch_to_the_compiled_size(tmp_path, monkeypatch):
    """A compiled graph is built for one batch size: a shard's smaller last batch is padded to it
    (its last pair repeated) instead of being compiled again, and only its own outputs are kept."""
    index, manifest = make_dataset(tmp_path)
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    cfg = {"batch_size": 3, "shard_size": 8}  # 4 pairs a shard: batches of 3 and 1
    generate(ckpt, index, manifest, tmp_path / "eager", small_cfg(**cfg))
    recorder = Recorder()
    monkeypatch.setattr(torch, "compile", recorder)
    generate(ckpt, index, manifest, tmp_path / "padded", small_cfg(compile=True, **cfg))
    assert len(recorder.calls) > 2 and set(recorder.calls) == {("Generator", 3)}
    eager, padded = shard_arrays(tmp_path / "eager"), shard_arrays(tmp_path / "padded")
    assert eager.keys() == padded.keys()
    for shard, arrays in eager.items():
        for k, a in arrays.items():
            b = padded[shard][k]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), k
            if a.dtype.kind == "O":
                assert a.tolist() == b.tolist(), k
            else:
                assert np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 1, k


def test_inference_memory_format_is_nchw_eager_and_channels_last_compiled_on_a_gpu():
    """The issue's H200 figures (paper size, bf16): eager 1,535 img/s NCHW against 1,300 channels_last,
    compiled channels_last 3,457. Inputs follow the format the weights are in."""
    from hybrid.pipeline import _weights_format, memory_format

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory_format(cuda) == memory_format(cpu) == memory_format(cpu, compiled=True) == torch.contiguous_format
    assert memory_format(cuda, compiled=True) == torch.channels_last
    G = Generator(**TINY)
    assert _weights_format(G) == torch.contiguous_format
    assert _weights_format(G.to(memory_format=torch.channels_last)) == torch.channels_last
