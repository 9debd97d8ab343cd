"""The generation pipeline: a trained checkpoint applied to (reference, target) pairs.

:class:`HybridPipeline` is the entry point (diffusers style)::

    from hybrid.pipeline import HybridPipeline

    pipe = HybridPipeline.from_pretrained("results/train/checkpoint")
    out = pipe("reference.png", "target.png", manipulation="random", seed=3)
    out.images["AHE"], out.masks["AHE"], out.region   # uint8 arrays; out.save("out/") writes PNGs

It reads the checkpoint's recorded preprocessing (resolution, fit, edge model, depth source),
computes the target's edge and depth maps with :class:`hybrid.maps.MapComputer` as the preprocess
stage did, applies an optional manipulation inside a region (:mod:`hybrid.manipulate`) and runs
every decoder (AHD, AHE): each gives an image and its fusion mask M (paper 003, Sec. 3.5,
Fig. 2). With a depth-level checkpoint (AnomalyHybrid*) it adds aligned depth-level outputs:
AH* sees the generated image as its target image and the pair target's *unmanipulated* depth
and edge as its reference maps, so the depth anomaly lands where the RGB anomaly is.

The batched functions below (:func:`conditions`, :func:`generate_batch`, :func:`encode_batch`)
are the same computation over many pairs; the generate stage (:mod:`hybrid.stages.generate`)
runs them from a DataLoader and writes shards. Each pair carries its own seed, so an output does
not depend on its batch. ``feature_noise`` adds AnomalyFactory's diversity noise (paper 002,
Sec. 3.3) to the encoded features, drawn from the pair's seed.

This module loads generators only (:meth:`Generator.from_pretrained`); it never imports training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from hybrid.compiled import eager_on_failure
from hybrid.config import resolve_device
from hybrid.data.shards import to_unit, unit_tensor
from hybrid.io import write_png
from hybrid.manipulate import MANIPULATED, ManipulateConfig, check_manipulation, local_anomaly
from hybrid.models.generator import Generator
from hybrid.seeds import derive_seed
from hybrid.viz import contact_sheet

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        log.info("generate: bf16 autocast is only used on CUDA; running fp32 on %s", device)
        return "fp32"
    return precision


def memory_format(device: torch.device, compiled: bool = False) -> torch.memory_format:
    """The generator's memory format for inference: NCHW, except channels_last under torch.compile
    on a GPU. Measured on one H200, paper-size generator, batch 64, bf16: eager 1,535 img/s NCHW
    against 1,300 channels_last; compiled channels_last 3,457."""
    return torch.channels_last if compiled and device.type == "cuda" else torch.contiguous_format


def _weights_format(G: torch.nn.Module) -> torch.memory_format:
    """The memory format G's convolution weights are in (its inputs are given the same)."""
    w = next((p for p in G.parameters() if p.ndim == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1), None)
    if w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _pad_rows(batch: Mapping[str, object], n: int) -> dict[str, object]:
    """``batch`` with each tensor's rows (dim 0) padded to ``n`` by repeating its last row."""
    return {k: torch.cat([v, v[-1:].expand(n - len(v), *v.shape[1:])])
            if isinstance(v, torch.Tensor) and v.ndim and 0 < len(v) < n else v for k, v in batch.items()}


def load_generator(checkpoint: str | Path, device: torch.device, level: str = "rgb") -> Generator:
    """The checkpoint's generator of ``level`` (rgb or depth) on ``device``, in eval mode."""
    what = "generate's checkpoint" if level == "rgb" else "generate's depth-level checkpoint"
    G = Generator.from_pretrained(checkpoint, level=level, purpose=what)
    return G.to(device, memory_format=memory_format(device)).eval()


def conditions(reference: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], manipulation: str,
               seed: int, cfg: ManipulateConfig,
               masks: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The named maps of one pair: ``reference_*`` as given, ``target_edge``/``target_depth`` as fed
    (manipulated inside the region for a local anomaly) and ``region`` (1, H, W) bool.

    Items hold ``image`` (3, H, W) and ``edge``/``depth`` (1, H, W) in [-1, 1]. ``manipulation``:
    "none" (global / normal) or a manipulation name, drawn with ``np.random.default_rng(seed)``.
    ``masks`` (target, reference) (H, W): the region comes from these real defect masks.
    """
    if manipulation == "none":
        maps = {k: v for k, v in target.items() if k in MANIPULATED}
        region = torch.zeros(1, *target["image"].shape[-2:], dtype=torch.bool)
    else:
        maps, region = local_anomaly(target, reference, manipulation, np.random.default_rng(seed), cfg, masks)
    return {**{f"reference_{k}": v for k, v in reference.items()}, **{f"target_{k}": v for k, v in maps.items()},
            "region": region.cpu()}


def feature_noise(G: Generator, seed: int, std: float, height: int, width: int) -> torch.Tensor:
    """AnomalyFactory's diversity noise for one pair: N(0, std^2) of the encoded features' shape,
    drawn from the pair's seed (so an output does not depend on its batch)."""
    return seeded_noise(G.feature_shape(height, width), seed, std)


def seeded_noise(shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """:func:`feature_noise` given the features' shape (no generator needed: DataLoader workers)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 7, bits=32))
    return torch.randn(shape, generator=g) * std


@torch.inference_mode()
def run_generator(G: Generator, batch: Mapping[str, torch.Tensor], precision: str = "fp32") -> dict:
    """Each decoder's ``{"image": (B, 3, H, W) in [-1, 1], "mask": (B, 1, H, W)}`` as CPU float
    tensors, for stacked named maps (``conditions`` of several pairs); bf16 autocast if asked.
    A ``feature_noise`` entry (B, C, h, w) is added to the encoded features."""
    out = _forward(G, batch, precision)
    return {d: {"image": o["image"].float().clamp(-1, 1).cpu(), "mask": o["mask"].float().clamp(0, 1).cpu()}
            for d, o in out.items()}


def _forward(G: Generator, batch: Mapping[str, torch.Tensor], precision: str) -> dict:
    """G on its device over stacked named maps (+ ``feature_noise``), bf16 autocast if asked. Maps
    may come as stored (uint8 images): they are converted on the device."""
    device = next(G.parameters()).device
    x = _inputs(G, batch, device, _weights_format(G))
    noise = batch.get("feature_noise")
    noise = noise.to(device, non_blocking=True) if noise is not None else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = G(x, noise)
    return out


def _inputs(G: Generator, batch: Mapping[str, torch.Tensor], device: torch.device,
            fmt: torch.memory_format) -> torch.Tensor:
    """``G.inputs`` of the batch's maps converted on the device (:func:`unit_tensor`), each straight
    into its channels of one input tensor: the same values, without a float copy of every map and
    their concatenation."""
    maps = {c: batch[c].to(device, non_blocking=True) for c in G.conditions if c in batch}
    if len(maps) < len(G.conditions):
        return G.inputs(maps)  # names what is missing
    first = next(iter(maps.values()))
    x = torch.empty((len(first), G.in_channels, *first.shape[-2:]), device=device, memory_format=fmt)
    for c, m in maps.items():
        unit_tensor(m, out=x[:, G.slices[c]])
    return x


def generate_batch(G: Generator, references: Sequence[Mapping[str, torch.Tensor]],
                   targets: Sequence[Mapping[str, torch.Tensor]], manipulations: Sequence[str],
                   seeds: Sequence[int], cfg: ManipulateConfig, precision: str = "fp32",
                   noise: float = 0.0, G_star: Generator | None = None) -> dict:
    """:func:`conditions` of each pair, stacked, plus :func:`run_generator`'s outputs per decoder:
    ``{"target_edge", "target_depth", "region", ..., "AHD": {"image", "mask"}, "AHE": {...}}``;
    with ``G_star`` each decoder's entry also holds ``depth_generated`` / ``edge_generated``."""
    items = [conditions(r, t, m, s, cfg) for r, t, m, s in zip(references, targets, manipulations, seeds, strict=True)]
    for it, t, s in zip(items, targets, seeds):
        if noise:
            it["feature_noise"] = feature_noise(G, s, noise, *t["image"].shape[-2:])
        if G_star is not None:
            it |= {f"source_{k}": t[k] for k in ("depth", "edge")}
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    out = run_generator(G, batch, precision)
    if G_star is not None:
        add_depth_level(G_star, batch, out, precision)
    return {**batch, **out}


def add_depth_level(G_star: Generator, batch: Mapping[str, torch.Tensor], out: dict, precision: str) -> None:
    """AH* on each decoder's generated image (paper 003, Fig. 2b): target_image = that image,
    reference depth / edge = the pair target's unmanipulated maps (``source_depth`` /
    ``source_edge``); adds ``depth_generated`` (AH*'s AHD) and ``edge_generated`` (its AHE)."""
    for o in out.values():
        star = run_generator(G_star, {"target_image": o["image"], "reference_depth": batch["source_depth"],
                                      "reference_edge": batch["source_edge"]}, precision)
        if "AHD" in star:
            o["depth_generated"] = star["AHD"]["image"]
        if "AHE" in star:
            o["edge_generated"] = star["AHE"]["image"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), or (B, H, W) for one channel."""
    return _uint8_tensor(x).numpy()


def _uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8` as a tensor on ``x``'s device (on a GPU a view with channels last)."""
    return _as_uint8(_to_255(x))


def _to_255(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> whole numbers 0..255 in float, elementwise (any shape; a new tensor)."""
    return x.float().clamp(-1, 1).add_(1).mul_(127.5).round_()


def stored_values(x: torch.Tensor, depth: bool = False) -> torch.Tensor:
    """[-1, 1] values of any shape as the shards store them, elementwise: uint8 0..255, or depth's
    uint16 0..65535 as int32 (the numbers of :func:`to_uint8` / :func:`_depth_int32`)."""
    if depth:
        return x.float().clamp(-1, 1).add_(1).mul_(32767.5).round_().to(torch.int32)
    return _to_255(x).to(torch.uint8)


def _as_uint8(a: torch.Tensor) -> torch.Tensor:
    """Whole numbers 0..255 in float (B, C, H, W) as uint8 (B, H, W, C), or (B, H, W) for one
    channel. On a CPU numpy's cast and OpenCV's channel merge: about 2.5x faster than torch's
    cast and strided copy (0.18 against 0.45 ms for a 256 px RGB image), the same bytes."""
    if a.device.type != "cpu":
        a = a.to(torch.uint8).permute(0, 2, 3, 1)
        return a[..., 0] if a.shape[-1] == 1 else a
    planes = a.numpy().astype(np.uint8)
    if planes.shape[1] == 1:
        return torch.from_numpy(planes[:, 0])
    out = np.empty((planes.shape[0], *planes.shape[2:], planes.shape[1]), np.uint8)
    for image, dst in zip(planes, out):
        cv2.merge(list(image), dst=dst)
    return torch.from_numpy(out)


def _depth_uint16(x: torch.Tensor) -> np.ndarray:
    return _depth_int32(x).numpy().astype(np.uint16)


def _depth_int32(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 1, H, W) -> (B, H, W) int32 in 0..65535 (stored as uint16), on ``x``'s device."""
    return stored_values(x[:, 0], depth=True)


DEFAULT_DATA = {"resolution": 256, "fit": "stretch", "edge_model": "canny", "depth_source": "depth_anything_small"}


ONE_OFF_DEPTH = ("depth_anything_small", "depth_anything_base", "depth_anything_large", "sensor", "dataset", "flat",
                 "none")


def one_off_depth_source(asked: str | None, trained: str, needed: bool, files: tuple, paths: Mapping | None) -> str:
    """The depth source of a one-off generation: what the user asked for, else the checkpoint's.
    When that cannot run here, one message lists every option; a flat depth is used only when asked."""
    if not needed:
        return "none"
    if asked is not None and asked not in ONE_OFF_DEPTH:
        raise ValueError(f"--depth-source {asked!r}: use one of {', '.join(ONE_OFF_DEPTH)}")
    source = asked or ("sensor" if all(files) else trained)
    options = ("give --reference-depth and --target-depth files (xyz / depth TIFFs), or --depth-source "
               "depth_anything_small (Depth Anything V2 weights; `hybrid models fetch depth_anything_small`), or "
               "--depth-source flat (a constant depth: AHD then sees no structure)")
    if source == "none":
        raise ValueError(f"this checkpoint was trained with depth (from {trained!r}) and needs a depth map: {options}")
    if source in ("sensor", "dataset") and not all(files):
        raise ValueError(f"this checkpoint learned from depth files (depth source {trained!r}), and none were given: "
                         f"{options}")
    if source.startswith("depth_anything"):
        from hybrid.models import store

        if store.present(source, dict(paths or {})) is None:
            if store.offline():
                raise ValueError(f"the depth source {source!r} needs its weights, which are not here (offline): "
                                 f"{options}")
    if source == "flat":
        log.warning("generate: a flat depth map stands in for the depth this checkpoint learned from (%s)", trained)
    return source


@torch.inference_mode()
def encode_batch(G: Generator, batch: Mapping[str, torch.Tensor], precision: str,
            G_star: Generator | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Each decoder's outputs as the shards store them, computed on G's device (asynchronously on
    a GPU): ``image`` uint8 (B, H, W, C), ``mask`` uint8 (B, H, W), with AH* ``depth_generated``
    int32 (B, H, W) (the uint16 values) and ``edge_generated`` uint8 (B, H, W). The same numbers as
    :func:`run_generator` (+ :func:`add_depth_level`) followed by :func:`to_uint8`: the same
    elementwise operations, on the device instead of the host."""
    device = next(G.parameters()).device
    out = _forward(G, batch, precision)
    star_maps = None
    if G_star is not None:
        star_maps = {k: unit_tensor(batch[f"source_{k}"].to(device, non_blocking=True)) for k in ("depth", "edge")}
    result = {}
    for d, o in out.items():  # the outputs are converted in place (their own tensors, or float copies)
        image, mask = o["image"].float().clamp_(-1, 1), o["mask"].float().clamp_(0, 1)
        star = {}
        if G_star is not None:
            xs = G_star.inputs({"target_image": image, "reference_depth": star_maps["depth"],
                                "reference_edge": star_maps["edge"]}).contiguous(memory_format=_weights_format(G_star))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                star = G_star(xs)
        enc = {"image": _as_uint8(image.add_(1).mul_(127.5).round_()).contiguous(),
               "mask": _as_uint8(mask.mul_(255).round_())}
        if "AHD" in star:
            enc["depth_generated"] = _depth_int32(star["AHD"]["image"].float().clamp(-1, 1))
        if "AHE" in star:
            enc["edge_generated"] = _uint8_tensor(star["AHE"]["image"].float().clamp(-1, 1)).contiguous()
        result[d] = enc
    return result


# ----------------------------------------------------------------------------- the entry point


def as_image(x: object, size: int, how: str) -> np.ndarray:
    """A uint8 RGB (size, size, 3) image from a path, a PIL image or an array (H, W, 3) / (H, W),
    fitted like the checkpoint's training images (``how``: stretch | crop | pad)."""
    from hybrid.data.images import fit, read_image

    if isinstance(x, (str, Path)):
        return read_image(x, size, how)
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"))
    a = np.asarray(x)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be (H, W, 3) RGB, (H, W) gray or a path / PIL image; got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (0..255); got {a.dtype}")
    return fit(np.ascontiguousarray(a[..., :3]), size, how)


@dataclass
class HybridOutput:
    """One pair's outputs, as uint8 arrays at the checkpoint's resolution.

    ``images[d]`` (H, W, 3) and ``masks[d]`` (H, W, the fusion mask M: 255 = generated texture)
    per decoder ``d``; ``region`` (H, W) bool: where the manipulation acted (all False for a global
    hybrid), the same for every decoder; ``fed``: the target maps the generator saw
    (``target_edge``, ``target_depth``); with AH*, ``depth`` / ``edge`` per decoder."""

    reference: np.ndarray
    target: np.ndarray
    manipulation: str
    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    region: np.ndarray
    fed: dict[str, np.ndarray] = field(default_factory=dict)
    depth: dict[str, np.ndarray] = field(default_factory=dict)
    edge: dict[str, np.ndarray] = field(default_factory=dict)

    def files(self) -> dict[str, np.ndarray]:
        """Name -> array of every output, as :meth:`save` names the PNGs."""
        out: dict[str, np.ndarray] = {}
        for d in self.images:
            out[d], out[f"{d}_mask"] = self.images[d], self.masks[d]
            for k, maps in (("depth", self.depth), ("edge", self.edge)):
                if d in maps:
                    out[f"{d}_{k}"] = maps[d]
        out["region"] = self.region.astype(np.uint8) * 255
        return out | self.fed

    def sheet(self) -> np.ndarray:
        """One labelled row: reference, target, fed maps, region, each decoder's image, mask (, AH*)."""
        files = self.files()
        order = ["reference", "target", *self.fed, "region",
                 *(n for d in self.images for n in (d, f"{d}_mask", f"{d}_depth", f"{d}_edge") if n in files)]
        arrays = {"reference": self.reference, "target": self.target, **files}
        size = self.reference.shape[0]
        return contact_sheet([arrays[n] for n in order],
                             [n if n != "region" else f"region ({self.manipulation})" for n in order],
                             cols=len(order), cell=min(max(size, 128), 256))

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write ``<name>.png`` for every output and ``sheet.png`` into the folder ``out``."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; give a folder for the outputs")
        written = {}
        for name, a in {**self.files(), "sheet": self.sheet()}.items():
            write_png(out / f"{name}.png", a)
            written[name] = out / f"{name}.png"
        return written


class HybridPipeline:
    """A trained generator (and optionally AH*) with the preprocessing it was trained on.

    Build it with :meth:`from_pretrained`; call it on a (reference, target) pair. The edge and depth
    networks are loaded on first use and kept.
    """

    def __init__(self, generator: Generator, data: Mapping | None = None, device: str | torch.device = "auto",
                 precision: str = "auto", generator_star: Generator | None = None,
                 paths: Mapping[str, str] | None = None) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        fmt = memory_format(self.device)
        self.generator = generator.to(self.device, memory_format=fmt).eval()
        self.generator_star = None
        if generator_star is not None:
            self.generator_star = generator_star.to(self.device, memory_format=fmt).eval()
        self._eager: tuple[Generator, Generator | None] | None = None  # the modules under torch.compile
        self._rows: int | None = None  # compiled: the batch size smaller batches are padded to
        self.data = {**DEFAULT_DATA, **dict(data or {})}
        self.precision = resolve_precision(precision, self.device)
        self.paths = dict(paths or {})  # model-store name -> explicit weight path
        self._maps: dict[tuple[str, str], object] = {}

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, device: str | torch.device = "auto",
                        depth_checkpoint: str | Path | None = None, precision: str = "auto",
                        paths: Mapping[str, str] | None = None) -> HybridPipeline:
        """The pipeline of a checkpoint folder (config.json + model.safetensors); with
        ``depth_checkpoint`` (a train_depth checkpoint) also AH*'s depth-level outputs."""
        G = Generator.from_pretrained(checkpoint, level="rgb", purpose="generate's checkpoint")
        data = json.loads((Path(checkpoint) / "config.json").read_text()).get("data", {})
        star = None
        if depth_checkpoint is not None:
            star = Generator.from_pretrained(depth_checkpoint, level="depth",
                                             purpose="generate's depth-level checkpoint")
        return cls(G, data, device, precision, star, paths)

    @property
    def decoders(self) -> list[str]:
        return list(self.generator.decoder_names)

    @property
    def needs(self) -> set[str]:
        """The map kinds the generator's conditions need: a subset of {edge, depth}."""
        return {m for m in ("edge", "depth") if any(c.endswith("_" + m) for c in self.generator.conditions)}

    def compute_maps(self, images: np.ndarray, edge_model: str, depth_source: str) -> dict[str, np.ndarray]:
        """Edge (uint8) and Depth Anything depth (uint16) maps of uint8 images (B, H, W, 3), as the
        preprocess stage stores them (:class:`hybrid.maps.MapComputer`, loaded once per setting)."""
        from hybrid.maps import DEPTH_MODELS, MapComputer

        if depth_source not in (*DEPTH_MODELS, "none"):
            raise ValueError(f"depth source {depth_source!r} reads depth files: pass reference_depth and target_depth "
                             "(--reference-depth / --target-depth), or choose depth_anything_small")
        key = (edge_model, depth_source)
        if key not in self._maps:
            self._maps[key] = MapComputer(edge_model, depth_source, self.device, self.paths)
        return self._maps[key](images)

    def __call__(self, reference: object, target: object, manipulation: str = "none", seed: int = 0,
                 manipulate: ManipulateConfig | Mapping | None = None, feature_noise: float = 0.0,
                 edge_model: str | None = None, depth_source: str | None = None,
                 reference_depth: str | Path | None = None, target_depth: str | Path | None = None) -> HybridOutput:
        """Generate from ``reference`` (appearance) and ``target`` (structure: its edges and depth).

        Images are paths, PIL images or uint8 arrays. ``manipulation``: none (a global hybrid),
        random (one of the configured manipulations, drawn from ``seed``) or a name (merge, remove,
        replace, tps: a local anomaly inside a drawn region). ``edge_model`` / ``depth_source``
        override the checkpoint's; sensor depth (depth source sensor / dataset) is read from the
        ``reference_depth`` / ``target_depth`` files; ``depth_source="flat"`` (a constant depth) is
        used only when asked for.
        """
        from hybrid.models.depth import sensor_nearness, to_uint16

        cfg = manipulate if isinstance(manipulate, ManipulateConfig) else ManipulateConfig.from_dict(manipulate or {})
        if manipulation == "random":
            manipulation = cfg.manipulations[int(np.random.default_rng(seed).integers(len(cfg.manipulations)))]
        elif manipulation != "none":
            check_manipulation(manipulation)
        size, how = int(self.data["resolution"]), str(self.data["fit"])
        edge_model = edge_model or (self.data["edge_model"] if "edge" in self.needs else "none")
        depth_source = one_off_depth_source(depth_source, self.data["depth_source"], "depth" in self.needs,
                                            (reference_depth, target_depth), self.paths)
        images = np.stack([as_image(x, size, how) for x in (reference, target)])
        estimated = depth_source if depth_source.startswith("depth_anything") else "none"
        maps = self.compute_maps(images, edge_model, estimated)
        if depth_source in ("sensor", "dataset"):
            maps["depth"] = to_uint16(np.stack([sensor_nearness(p, (size, size))
                                                for p in (reference_depth, target_depth)]))
        elif depth_source == "flat":
            maps["depth"] = np.full((2, size, size), 32768, np.uint16)
        if self.generator_star is not None and not {"edge", "depth"} <= set(maps):
            raise ValueError("the depth-level checkpoint needs the target's edge and depth maps; give the edge model "
                             "and depth source (or depth files) they were trained with")
        items = [{"image": to_unit(images[i], "image"), **{k: to_unit(v[i], k) for k, v in maps.items()}}
                 for i in (0, 1)]
        result = generate_batch(self.generator, [items[0]], [items[1]], [manipulation], [seed], cfg,
                                self.precision, feature_noise, self.generator_star)
        out = HybridOutput(images[0], images[1], manipulation,
                           images={d: to_uint8(result[d]["image"])[0] for d in self.decoders},
                           masks={d: to_uint8(result[d]["mask"] * 2 - 1)[0] for d in self.decoders},
                           region=result["region"][0, 0].numpy().astype(bool),
                           fed={f"target_{k}": to_uint8(result[f"target_{k}"])[0]
                                for k in MANIPULATED if f"target_{k}" in result})
        for d in self.decoders:
            if "depth_generated" in result[d]:
                out.depth[d] = to_uint8(result[d]["depth_generated"])[0]
            if "edge_generated" in result[d]:
                out.edge[d] = to_uint8(result[d]["edge_generated"])[0]
        return out

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The batched form (the generate stage): :func:`encode_batch` with this pipeline's models.
        Compiled (:meth:`compile`), a smaller batch than the first (a shard's last) is padded to the
        first's size by repeating its last pair, so the compiled graph is not built again for it;
        a call that fails (a compiler error) is run again eagerly, and eagerly from then on, with a
        warning."""
        n = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
        if self._eager is not None and 0 < n < (self._rows or n):
            out = self.encode(_pad_rows(batch, self._rows))
            return {d: {k: v[:n] for k, v in o.items()} for d, o in out.items()}
        if self._eager is not None:
            self._rows = max(self._rows or 0, n)
        return eager_on_failure(lambda: encode_batch(self.generator, batch, self.precision, self.generator_star),
                                self._eager is not None, self.uncompile, "generate.compile", "generating eagerly")

    def compile(self) -> None:
        """Run the generator (and AH*) through ``torch.compile`` (``generate.compile``), channels_last
        on a GPU (:func:`memory_format`). Compiling happens at the first batch of each new shape;
        outputs differ from eager ones by float rounding only."""
        if self._eager is not None:
            return
        self._eager = (self.generator, self.generator_star)
        fmt = memory_format(self.device, compiled=True)
        self.generator = torch.compile(self.generator.to(memory_format=fmt))
        if self.generator_star is not None:
            self.generator_star = torch.compile(self.generator_star.to(memory_format=fmt))

    def uncompile(self) -> None:
        """Back to the eager modules, in the eager memory format."""
        if self._eager is None:
            return
        fmt = memory_format(self.device)
        G, star = self._eager
        self.generator = G.to(memory_format=fmt)
        self.generator_star = star.to(memory_format=fmt) if star is not None else None
        self._eager = None


def generate_one(checkpoint: str | Path, reference: str | Path, target: str | Path, out: str | Path,
                 manipulation: str = "none", seed: int = 0, edge_model: str | None = None,
                 depth_source: str | None = None, reference_depth: str | Path | None = None,
                 target_depth: str | Path | None = None, device: str = "auto",
                 cfg: ManipulateConfig | None = None, paths: Mapping[str, str] | None = None,
                 depth_checkpoint: str | Path | None = None, feature_noise: float = 0.0) -> dict[str, Path]:
    """``hybrid generate``: :class:`HybridPipeline` on two image files, the outputs saved into ``out``
    (``<decoder>.png``, ``<decoder>_mask.png``, ``region.png``, the fed ``target_edge.png`` /
    ``target_depth.png``, with AH* ``<decoder>_depth.png`` / ``<decoder>_edge.png``, and ``sheet.png``)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the outputs")
    if manipulation not in ("none", "random"):
        check_manipulation(manipulation)
    pipe = HybridPipeline.from_pretrained(checkpoint, device, depth_checkpoint, paths=paths)
    result = pipe(reference, target, manipulation, seed, cfg, feature_noise, edge_model, depth_source,
                  reference_depth, target_depth)
    return result.save(out)
