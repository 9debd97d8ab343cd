"""BlazeDetector: the blaze level of the generator, learning heatmaps from Flare's anomalies, bad inputs."""

import contextlib
import json

import pytest
import torch
from torch import nn

from hybrid.checkpoint import load_checkpoint
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator
from hybrid.stages.blaze import BlazeConfig, blaze_targets
from hybrid.stages.blaze import run as run_blaze
from hybrid.stages.boot import BLAZE_MODEL
from hybrid.stages.flare import af_step
from hybrid.train import TrainConfig
from tests.af_data import AUGMENT, MANIPULATE, TRAIN, make_results, save_af_checkpoint
from tests.test_flare import toy_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def blaze_run(data, flare, out, **kw):
    return run_blaze(data["index"], data["manifest"], flare, out / "ckpt", out / "losses.csv", out / "samples",
                     out / "work", TRAIN, {"epochs": 1, "batch_size": 4, **kw.pop("blaze", {})},
                     {"epochs": 1, "region_mix": 0.0}, AUGMENT, MANIPULATE, **kw)


class ToyFlare(nn.Module):
    """A Flare stand-in: the anomaly is a bright patch where the edited edges are dense (the toy region)."""

    conditions = ["reference_image", "target_edge"]

    def inputs(self, maps):
        return torch.cat([maps[c] for c in self.conditions], 1)

    def forward(self, x, noise=None):
        ref, edge = x[:, :3], x[:, 3:]
        region = (nn.functional.avg_pool2d((edge > 0).float(), 5, 1, 2) > 0.15).float()
        return {"AHE": {"image": ref * (1 - region) + region, "mask": region}}


def test_blaze_level_fuses_onto_the_anomaly_image_and_learns_the_normal_one():
    G = Generator(**BLAZE_MODEL, ngf=4, n_downsample=2, n_blocks=1)
    assert G.in_channels == 4 and G.out_channels == 3
    assert G.bases == {"AHE": "target_image"} and G.targets == {"AHE": "reference_image"}
    x = torch.rand(2, 4, 16, 16) * 2 - 1
    out = G(x)["AHE"]
    assert torch.allclose(out["image"], x[:, :3] * (1 - out["mask"]) + out["texture"] * out["mask"])
    with pytest.raises(ValueError, match="not among the model conditions"):
        Generator(level="blaze", conditions=["reference_image", "target_edge"], decoders=["AHE"])


def test_blaze_heatmap_is_higher_inside_the_manipulated_regions():
    torch.manual_seed(0)
    G = Generator(**BLAZE_MODEL, ngf=8, n_downsample=2, n_blocks=1)
    D = MultiscaleDiscriminator(7, 8, 3, 1)
    cfg = TrainConfig(perceptual="none", lambda_l1=10.0, ndf=8, num_D=1)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999)) for m in (G, D)]
    flare, g = ToyFlare(), torch.Generator().manual_seed(1)
    for step in range(150):
        t = blaze_targets(G, flare, toy_batch(g), 0.0, step)
        af_step(G, D, None, *opts, t["cond"], t["target"], t["heat"], 10.0, None, cfg, contextlib.nullcontext())
    b = toy_batch(torch.Generator().manual_seed(99), n=32)
    t = blaze_targets(G, flare, b, 0.0, 0)
    with torch.no_grad():
        heat = G(t["cond"])["AHE"]["mask"]
    inside, outside = heat[t["heat"] > 0.5].mean(), heat[t["heat"] < 0.5].mean()
    assert inside > outside + 0.3, (float(inside), float(outside))


def test_blaze_trains_from_flare_and_refuses_other_checkpoints(tmp_path):
    data = make_results(tmp_path)
    flare = save_af_checkpoint(tmp_path / "flare", "flare")
    out = blaze_run(data, flare, tmp_path / "b")
    G = load_checkpoint(out)
    cfg = json.loads((out / "config.json").read_text())
    assert G.level == "blaze" and cfg["anomalyfactory"]["stage"] == "blaze" and cfg["anomalyfactory"]["w_bh"] == 10.0
    assert (tmp_path / "b" / "losses.csv").exists()
    with pytest.raises(FileNotFoundError) as e:
        blaze_run(data, tmp_path / "nothing", tmp_path / "c")
    assert "results/anomalyfactory/flare/checkpoint" in str(e.value) and "flare rule" in str(e.value)
    boot = save_af_checkpoint(tmp_path / "boot", "boot")
    with pytest.raises(ValueError, match="holds a Boot checkpoint"):
        blaze_run(data, boot, tmp_path / "c")
    with pytest.raises(ValueError, match="anomalyfactory.blaze.init"):
        BlazeConfig.from_dict({"init": "boot"})
