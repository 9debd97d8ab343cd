"""AnomalyHybrid generator: a pix2pixHD GlobalGenerator encoder shared by decoder groups.

Each decoder group (AHD: depth-controlled, AHE: edge-controlled) has a texture branch (``A_gen``,
Tanh) and a fusion-mask branch (``M``, Sigmoid), both with the pix2pixHD decoder structure, and
fuses them per Eq. 1 of AnomalyHybrid:

    out = C_in * (1 - M) + A_gen * M

``C_in`` is "the input reference content" (paper 003, Sec. 3.2; AnomalyFactory's I_in, "a normal
image"): the *reference* RGB among the conditions, so M = 1 marks pixels taken from the generated
texture and M = 0 pixels copied from the reference. The conditions are named maps concatenated in
``conditions`` order; the ``level`` picks what each decoder fuses and learns:

- ``rgb`` (AnomalyHybrid): conditions reference_image + target_depth + target_edge (5 channels);
  both groups output RGB with C_in = reference_image. AHD learns the target image under the
  geometry of the depth condition, AHE under that of the edge condition (paper 003, Sec. 3.4,
  Eq. 2-4): in training each condition gets its own augmentation, so AHD is taught to follow depth
  and AHE to follow edges. AnomalyFactory-style edge-only: ``decoders=["AHE"],
  conditions=["reference_image", "target_edge"]`` (4 channels).
- ``depth`` (AnomalyHybrid*, Sec. 3.1): conditions target_image + reference_depth +
  reference_edge; AHD outputs depth (C_in = reference_depth, learns target_depth) and AHE edges
  (C_in = reference_edge, learns target_edge), 1 channel each, both under the geometry of the
  target image that guides them. Start it from an RGB-level model with :meth:`Generator.init_from`
  (every tensor whose name and shape match is copied).

:data:`ROLES` is the one place that says, per level and decoder, what is fused (``base``), which
condition's geometry the decoder follows (``guide``) and what it learns (``learns``, a map taken
under the guide's augmentation). Training builds its pairs from it.

``forward(x, noise)`` adds ``noise`` (shape :meth:`feature_shape`) to the encoded features before
the decoders: AnomalyFactory's diversity noise (paper 002, Sec. 3.3).

A checkpoint folder is ``config.json`` (``{"model": constructor arguments, ...}`` plus whatever
the trainer records: data, train settings, step) + ``model.safetensors`` + a model card
``README.md``: :meth:`Generator.save_pretrained` writes them, :meth:`Generator.from_pretrained`
reads them. Training state (discriminator, optimizers, RNG) is :mod:`hybrid.checkpoint`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hybrid.determinism import ReflectionPad2d

_UMASK = os.umask(0)
os.umask(_UMASK)
LEVEL_NAMES = {"rgb": "rgb-level (AnomalyHybrid)", "depth": "depth-level (AnomalyHybrid*)",
               "blaze": "Blaze-level (AnomalyFactory BlazeDetector)"}

CHANNELS = {"image": 3, "depth": 1, "edge": 1}
DECODERS = ("AHD", "AHE")  # the decoder groups: depth-guided and edge-guided


@dataclass(frozen=True)
class Role:
    """What one decoder does: fuse onto ``base`` (C_in), follow ``guide``, learn ``learns``.

    ``learns`` is taken under the same augmentation draw as ``guide`` in training (the target
    shares its condition's geometry), while the reference maps get a draw of their own.
    """

    base: str
    guide: str
    learns: str


# level -> decoder -> role. The one table that says what each decoder learns.
ROLES: dict[str, dict[str, Role]] = {
    "rgb": {"AHD": Role(base="reference_image", guide="target_depth", learns="target_image"),
            "AHE": Role(base="reference_image", guide="target_edge", learns="target_image")},
    "depth": {"AHD": Role(base="reference_depth", guide="target_image", learns="target_depth"),
              "AHE": Role(base="reference_edge", guide="target_image", learns="target_edge")},
    # AnomalyFactory's BlazeDetector (paper 002, Sec. 3.4): fuses onto the anomaly image (target_image)
    # under its anomaly edge map and learns the normal image it came from (reference_image); M = H_B.
    "blaze": {"AHE": Role(base="target_image", guide="target_edge", learns="reference_image")},
}
DEFAULT_CONDITIONS = {
    "rgb": ["reference_image", "target_depth", "target_edge"],
    "depth": ["target_image", "reference_depth", "reference_edge"],
    "blaze": ["target_image", "target_edge"],
}


def map_channels(name: str) -> int:
    """Channels of a named map such as ``reference_image`` (3) or ``target_edge`` (1)."""
    role, _, modality = name.partition("_")
    if role not in ("reference", "target") or modality not in CHANNELS:
        raise ValueError(f"unknown map {name!r}: use reference_|target_ + one of {sorted(CHANNELS)}")
    return CHANNELS[modality]


def init_weights(m: nn.Module) -> None:
    """pix2pixHD ``weights_init``: conv weights N(0, 0.02), biases left at torch's default."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)


class ResnetBlock(nn.Module):
    """pix2pixHD ResnetBlock: reflect-pad, 3x3 conv, IN, ReLU, reflect-pad, 3x3 conv, IN; + x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
            ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


def make_encoder(in_channels: int, ngf: int, n_downsample: int, n_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7),
                               nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for i in range(n_downsample):
        c = ngf * 2**i
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 2**n_downsample) for _ in range(n_blocks)]
    return nn.Sequential(*layers)


def make_decoder(out_channels: int, ngf: int, n_downsample: int, head: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_downsample, 0, -1):
        c = ngf * 2**i
        layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
    layers += [ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), head]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """Shared encoder + ResnetBlocks, one (texture, mask) decoder pair per group; see module doc.

    ``forward(x)`` takes the conditions concatenated in ``self.conditions`` order (use
    :meth:`inputs`) and returns ``{decoder: {"image": fused, "texture": A_gen, "mask": M}}``;
    texture and image in [-1, 1], mask in [0, 1]. ``self.config`` holds the constructor arguments.
    """

    def __init__(self, level: str = "rgb", conditions: Sequence[str] | None = None,
                 decoders: Sequence[str] = ("AHD", "AHE"), ngf: int = 64, n_downsample: int = 4,
                 n_blocks: int = 9) -> None:
        super().__init__()
        if level not in ROLES:
            raise ValueError(f"model level {level!r} is unknown; use one of {sorted(ROLES)}")
        conditions = list(conditions or DEFAULT_CONDITIONS[level])
        unknown = [d for d in decoders if d not in ROLES[level]]
        if not decoders or unknown:
            raise ValueError(f"model decoders {list(decoders)}: use a non-empty subset of {sorted(ROLES[level])}")
        for d in decoders:
            role = ROLES[level][d]
            for what, name in (("fuses", role.base), ("follows", role.guide)):
                if name not in conditions:
                    raise ValueError(f"decoder {d} {what} {name!r}, which is not among the model conditions "
                                     f"{conditions}; add it to model.conditions or drop {d} from model.decoders")
        self.config = {"level": level, "conditions": conditions, "decoders": list(decoders), "ngf": ngf,
                       "n_downsample": n_downsample, "n_blocks": n_blocks}
        self.level, self.conditions, self.decoder_names = level, conditions, list(decoders)
        self.slices: dict[str, slice] = {}
        start = 0
        for name in conditions:
            self.slices[name] = slice(start, start + map_channels(name))
            start += map_channels(name)
        self.in_channels = start
        self.out_channels = 1 if level == "depth" else 3
        self.roles = {d: ROLES[level][d] for d in decoders}
        self.bases = {d: r.base for d, r in self.roles.items()}     # C_in of each decoder
        self.targets = {d: r.learns for d, r in self.roles.items()}  # what each decoder learns
        self.n_downsample = n_downsample
        self.feature_channels = ngf * 2**n_downsample
        self.encoder = make_encoder(self.in_channels, ngf, n_downsample, n_blocks)
        self.decoders = nn.ModuleDict({
            d: nn.ModuleDict({
                "texture": make_decoder(self.out_channels, ngf, n_downsample, nn.Tanh()),
                "mask": make_decoder(1, ngf, n_downsample, nn.Sigmoid()),
            }) for d in decoders
        })
        self.apply(init_weights)

    def inputs(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named maps (``{"reference_image": ..., "target_edge": ...}``) in order."""
        missing = [c for c in self.conditions if c not in maps]
        if missing:
            raise KeyError(f"generator conditions {missing} are missing; got maps {sorted(maps)}")
        return torch.cat([maps[c] for c in self.conditions], dim=1)

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (C, H, W) of one sample's encoded features, for :meth:`forward`'s ``noise``."""
        f = 2**self.n_downsample
        return self.feature_channels, height // f, width // f

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, dict[str, torch.Tensor]]:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"generator input has {x.shape[1]} channels, want {self.in_channels} "
                             f"({' + '.join(self.conditions)})")
        h = self.encoder(x)
        if noise is not None:
            h = h + noise.to(h.dtype)
        out = {}
        for d, branches in self.decoders.items():
            texture, mask = branches["texture"](h), branches["mask"](h)
            base = x[:, self.slices[self.bases[d]]]
            out[d] = {"image": base * (1 - mask) + texture * mask, "texture": texture, "mask": mask}
        return out

    def init_from(self, other: nn.Module) -> list[str]:
        """Copy every tensor of ``other`` whose name and shape match (AnomalyHybrid -> AH*).

        Returns the names of this model's tensors that kept their own initialisation.
        """
        return copy_matching(self, other.state_dict())

    def save_pretrained(self, path: str | Path, config: Mapping | None = None) -> Path:
        """Write ``config.json`` (``config`` with this model's ``"model"`` entry), ``model.safetensors``
        and the model card ``README.md`` into the folder ``path`` (created; files follow the umask).
        Not atomic by itself: trainers write into a temporary folder and rename it into place."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        full = {**dict(config or {}), "model": self.config}
        text = json.dumps(full, indent=2, sort_keys=True) + "\n"
        (path / "config.json").write_text(text)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / "model.safetensors")
        (path / "README.md").write_text(model_card(self, full, hashlib.sha256(text.encode()).hexdigest()[:16]))
        for f in ("config.json", "model.safetensors", "README.md"):  # safetensors writes 0600
            os.chmod(path / f, 0o666 & ~_UMASK)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, level: str | None = None, purpose: str = "this use") -> Generator:
        """The generator of a checkpoint folder, weights from model.safetensors, in eval mode.

        ``level``: the level the caller needs (rgb, depth, blaze); another level fails naming both.
        A missing folder, a missing or damaged file each fail with what to do.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json); point at a train "
                                    "stage's checkpoint/ folder, e.g. results/train/checkpoint")
        try:
            model = json.loads((path / "config.json").read_text())["model"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path / 'config.json'} is not a checkpoint config ({e}); restore the folder from "
                             "results/train/work/published or retrain") from None
        G = cls(**model)
        if level is not None and G.level != level:
            raise ValueError(f"{path} holds a {LEVEL_NAMES[G.level]} generator, but {purpose} needs a "
                             f"{LEVEL_NAMES[level]} one: use results/{'train' if level == 'rgb' else 'train_depth'}"
                             "/checkpoint")
        try:
            G.load_state_dict(load_file(path / "model.safetensors"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} has no model.safetensors: the checkpoint is incomplete; use a published "
                                    "one (results/train/checkpoint, or the copy in results/train/work/published)"
                                    ) from None
        except Exception as e:  # safetensors' own error type for a damaged file, or mismatched tensors
            raise ValueError(f"{path / 'model.safetensors'} cannot be loaded ({e}); the file is damaged or from "
                             "another model: restore it (results/train/work/published keeps the last published "
                             "copy) or retrain") from None
        return G.eval()


def model_card(G: Generator, config: Mapping, settings_hash: str) -> str:
    """The checkpoint's README.md: architecture, training data, steps, settings hash, how to load."""
    m, data, train = config["model"], dict(config.get("data") or {}), dict(config.get("train") or {})
    n = sum(p.numel() for p in G.parameters())
    lines = [f"# {LEVEL_NAMES.get(G.level, G.level)} generator", "",
             "Written by `hybrid` (pix2pixHD encoder shared by decoder groups, each a texture and a "
             "fusion-mask branch; paper 003 Sec. 3.2, Eq. 1).", "",
             "## Architecture", "",
             f"- level `{m['level']}`; decoders {', '.join(m['decoders'])}; conditions {', '.join(m['conditions'])}",
             f"- ngf {m['ngf']}, {m['n_downsample']} downsamplings, {m['n_blocks']} ResNet blocks; {n:,} parameters",
             "", "## Training data", ""]
    if data:
        lines += [f"- {data.get('n_samples', '?')} samples (select {data.get('select', '?')}) at "
                  f"{data.get('resolution', '?')} px ({data.get('fit', '?')})",
                  f"- edges: {data.get('edge_model', '?')}; depth: {data.get('depth_source', '?')} "
                  f"(shard array {data.get('depth_field', 'depth')})"]
    else:
        lines.append("- not recorded")
    lines += ["", "## Training", ""]
    if "step" in config:
        epochs = int(config["epoch"]) + 1 if "epoch" in config else "?"  # config's epoch: the last step's, 0-based
        lines.append(f"- {config['step']} steps over {epochs} epochs")
    if train:
        keys = ("epochs", "epochs_decay", "batch_size", "lr", "lambda_feat", "lambda_vgg", "shared_geometry")
        lines.append("- " + ", ".join(f"{k} {train[k]}" for k in keys if k in train))
    lines += [f"- settings hash `{settings_hash}` (sha256 of config.json)", "", "## Use", "", "```python",
              "from hybrid.pipeline import HybridPipeline", "",
              'pipe = HybridPipeline.from_pretrained("<this folder>")',
              'out = pipe("reference.png", "target.png", manipulation="random")', "```", ""]
    return "\n".join(lines)


@torch.no_grad()
def copy_matching(model: nn.Module, theirs: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy every tensor of ``theirs`` whose name and shape match into ``model``; return the rest."""
    kept = []
    for k, v in model.state_dict().items():
        if k in theirs and theirs[k].shape == v.shape:
            v.copy_(theirs[k])
        else:
            kept.append(k)
    return kept
