"""Training pairs as paper 003 builds them (Sec. 3.4, Fig. 4, Eq. 2-4): one augmentation per condition,
each decoder's target under the draw of the condition it follows, so AHD follows depth and AHE edges."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from hybrid.augment import AugmentConfig
from hybrid.checkpoint import load_checkpoint
from hybrid.models.generator import ROLES, Generator
from hybrid.train import PairDataset, draw_plan, train

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}


class Coordinates(Dataset):
    """Samples whose maps are coordinate grids: image = (x, y, x*y), depth = x, edge = y, so every
    warped map says exactly where each of its pixels came from."""

    def __init__(self, n: int, size: int = 24) -> None:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        self.item = {"image": torch.stack([xx, yy, xx * yy]), "depth": xx[None], "edge": yy[None]}
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.item


def strong_augment(**kw) -> AugmentConfig:
    return AugmentConfig(**{"tps_prob": 0.5, "rtp_prob": 1.0, "rtp_translate": 0.2, "flip_lr": 0.5,
                            "flip_tb": 0.5, **kw})


def test_roles_table_says_what_each_decoder_follows_and_learns():
    rgb = Generator(**SMALL)
    assert {d: (r.guide, r.learns) for d, r in rgb.roles.items()} == {
        "AHD": ("target_depth", "target_image"), "AHE": ("target_edge", "target_image")}
    assert {d: (r.guide, r.learns) for d, r in ROLES["depth"].items()} == {
        "AHD": ("target_image", "target_depth"), "AHE": ("target_image", "target_edge")}
    assert draw_plan(rgb) == {"target_depth": ["target_depth", "AHD_learns"],
                              "target_edge": ["target_edge", "AHE_learns"], "reference": ["reference_image"]}
    assert draw_plan(rgb, shared_geometry=True) == {
        "target": ["target_depth", "target_edge", "AHD_learns", "AHE_learns"], "reference": ["reference_image"]}
    star = Generator(level="depth", **SMALL)
    assert draw_plan(star) == {"target_image": ["target_image", "AHD_learns", "AHE_learns"],
                               "reference": ["reference_depth", "reference_edge"]}


def test_each_target_shares_exactly_its_conditions_geometry():
    pairs = PairDataset(Coordinates(64), Generator(**SMALL), strong_augment(), seed=5)
    differ = {"D vs E": 0, "D vs R": 0, "E vs R": 0}
    for i in range(len(pairs)):
        p = pairs[(0, i)]
        # A_d is the image under the depth's draw: its x channel is the warped depth, bit for bit.
        assert torch.equal(p["AHD_learns"][0:1], p["target_depth"])
        assert torch.equal(p["AHE_learns"][1:2], p["target_edge"])
        geo = {"D": p["AHD_learns"], "E": p["AHE_learns"], "R": p["reference_image"]}
        for name in differ:
            a, b = name.split(" vs ")
            differ[name] += not torch.allclose(geo[a], geo[b], atol=1e-4)
    # Three separate draws: the geometries differ for (nearly) every sample.
    assert all(v >= 60 for v in differ.values()), differ


def test_the_three_draws_are_independent():
    """With flips alone (p = 0.5 each), two independent draws agree on a flip half the time."""
    cfg = AugmentConfig(tps_prob=0.0, rtp_prob=0.0, flip_lr=0.5, flip_tb=0.0)
    pairs = PairDataset(Coordinates(400, size=8), Generator(**SMALL), cfg, seed=11)
    flipped = {k: [] for k in ("target_depth", "AHE_learns", "reference_image")}
    for i in range(len(pairs)):
        p = pairs[(3, i)]
        for k in flipped:
            flipped[k].append(bool(p[k][0, 0, 0] > 0))  # x channel starts at +1 after a left-right flip
    f = {k: np.array(v) for k, v in flipped.items()}
    assert all(0.4 < v.mean() < 0.6 for v in f.values())
    for a, b in (("target_depth", "AHE_learns"), ("target_depth", "reference_image"),
                 ("AHE_learns", "reference_image")):
        assert 0.4 < (f[a] == f[b]).mean() < 0.6, (a, b)


def test_shared_geometry_ablation_gives_both_decoders_one_target():
    pairs = PairDataset(Coordinates(8), Generator(**SMALL), strong_augment(), seed=5, shared_geometry=True)
    for i in range(len(pairs)):
        p = pairs[(0, i)]
        assert torch.equal(p["AHD_learns"], p["AHE_learns"])
        assert torch.equal(p["target_depth"], p["AHE_learns"][0:1])


# ----------------------------------------------------------------------------- behaviour
SIZE = 32
BACKGROUND = torch.tensor([-0.6, -0.6, -0.6])


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int = SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    if kind == "disc":
        return ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
    return ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)


def scene(mask: torch.Tensor, colour: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image (object of ``colour`` on a flat background), depth (object near) and edge (its outline)."""
    m = mask.float()
    image = BACKGROUND[:, None, None] * (1 - m) + colour[:, None, None] * m
    grown = torch.nn.functional.max_pool2d(m[None, None], 3, 1, 1)[0, 0]
    shrunk = -torch.nn.functional.max_pool2d(-m[None, None], 3, 1, 1)[0, 0]
    edge = (grown - shrunk)[None] * 2 - 1
    return {"image": image, "depth": m[None] * 2 - 1, "edge": edge}


class Scenes(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            kind = ("disc", "square")[int(rng.integers(2))]
            r = float(rng.uniform(4, 6))
            cx, cy = rng.uniform(8, SIZE - 8, 2)
            colour = torch.tensor([0.8, 0.3, -0.1]) + torch.from_numpy(rng.uniform(-0.15, 0.15, 3)).float()
            self.items.append(scene(shape_mask(kind, cx, cy, r), colour))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def objectness(image: torch.Tensor) -> torch.Tensor:
    """0 where the pixel has the background colour, 1 at a typical object colour."""
    ref = torch.tensor([0.8, 0.3, -0.1])
    return ((image - BACKGROUND[:, None, None]).norm(dim=0) / (ref - BACKGROUND).norm()).clamp(0, 1)


def follow_scores(checkpoint) -> dict[str, dict[str, float]]:
    """Feed a depth map of a disc on the left and an edge map of a square on the right (the
    reference's object at the top): how much of each decoder's object lies on each shape."""
    G = load_checkpoint(checkpoint)
    colour = torch.tensor([0.8, 0.3, -0.1])
    reference = scene(shape_mask("disc", 16, 6, 4), colour)
    depth_shape = shape_mask("disc", 9, 21, 5)
    edge_shape = shape_mask("square", 23, 21, 5)
    maps = {"reference_image": reference["image"][None], "target_depth": scene(depth_shape, colour)["depth"][None],
            "target_edge": scene(edge_shape, colour)["edge"][None]}
    with torch.no_grad():
        out = G(G.inputs(maps))
    return {d: {"depth_shape": float(objectness(o["image"][0])[depth_shape].mean()),
                "edge_shape": float(objectness(o["image"][0])[edge_shape].mean())} for d, o in out.items()}


def train_scenes(tmp_path, shared: bool):
    train(Scenes(64), tmp_path / "ckpt", tmp_path / "work",
          {"ngf": 8, "n_downsample": 2, "n_blocks": 2},
          {"epochs": 30, "epochs_decay": 10, "batch_size": 8, "perceptual": "none", "lambda_l1": 10.0,
           "ndf": 8, "n_layers_D": 2, "num_D": 1, "checkpoint_every": 10_000, "sample_every": 10_000,
           "log_every": 100, "seed": 0, "shared_geometry": shared},
          {"tps_prob": 0.3, "rtp_prob": 1.0, "rtp_translate": 0.25, "rtp_scale": [0.8, 1.2],
           "flip_lr": 0.5, "flip_tb": 0.5})
    return follow_scores(tmp_path / "ckpt")


MARGIN = 0.25  # objectness in [0, 1]: a decoder puts its object on its own condition's shape


def test_ahd_follows_depth_and_ahe_follows_edges(tmp_path):
    s = train_scenes(tmp_path, shared=False)
    assert s["AHD"]["depth_shape"] - s["AHD"]["edge_shape"] > MARGIN, s
    assert s["AHE"]["edge_shape"] - s["AHE"]["depth_shape"] > MARGIN, s
