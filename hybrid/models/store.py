"""The model store: one place that owns every pretrained file (name, source, checksum, licence).

Lookup order for ``locate(name, path)``: the explicit ``path``; ``$HYBRID_MODEL_DIR``; the user
cache (``$HYBRID_CACHE_DIR``, default ``~/.cache/hybrid``); then a logged download into the cache
with a progress bar and a checksum check, unless offline (``HYBRID_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``). Layout under a root: ``<family>/<filename>`` for files (e.g.
``pidinet/table5_pidinet.pth``, ``lpips/v0.1/vgg.pth``) and ``<family>/<repo name>/`` (a
``save_pretrained``/snapshot directory) for Hugging Face models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

VERIFY_MAX_BYTES = 50 * 2**20  # found files up to this size are checksummed by default


class MissingWeightsError(FileNotFoundError):
    """A pretrained file is not present and cannot be downloaded; the message says where to put it."""


class ChecksumError(RuntimeError):
    """A weights file's sha256 differs from the registered one."""


@dataclass(frozen=True)
class WeightSpec:
    """One pretrained file (``kind="file"``, from ``url``) or Hugging Face repo (``kind="hf"``, ``hub_id``).

    ``sha256``: the full hex digest (64 characters); or, for files whose full digest is not
    recorded, the torch.hub-style prefix from the upstream file name (``vgg19-dcbb9e9d.pth``), which
    is checked as a prefix; or "" when unknown (the digest is then only logged). HF repos: "".
    """

    name: str
    family: str
    filename: str
    url: str = ""
    hub_id: str = ""
    sha256: str = ""
    licence: str = ""
    kind: str = "file"
    note: str = ""

    @property
    def source(self) -> str:
        return self.hub_id if self.kind == "hf" else self.url

    @property
    def relpath(self) -> Path:
        return Path(self.family, self.filename)


_PIDINET = "https://github.com/hellozhuo/pidinet/raw/master/trained_models/"
_TV = "https://download.pytorch.org/models/"
_LPIPS = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"
_PIDINET_LIC = "MIT (research use)"
_TV_NOTE = "sha256 field is the torch.hub prefix from the file name (full digest not recorded)"


def _file(name: str, family: str, filename: str, url: str, sha256: str, licence: str, note: str = "") -> WeightSpec:
    return WeightSpec(name, family, filename, url=url, sha256=sha256, licence=licence, note=note)


def _hf(name: str, family: str, hub_id: str, licence: str, note: str = "") -> WeightSpec:
    return WeightSpec(name, family, hub_id.split("/")[-1], hub_id=hub_id, licence=licence, kind="hf", note=note)


REGISTRY: dict[str, WeightSpec] = {s.name: s for s in [
    _file("pidinet", "pidinet", "table5_pidinet.pth", _PIDINET + "table5_pidinet.pth",
          "80860ac267258b5f27486e0ef152a211d0b08120f62aeb185a050acc30da486c", _PIDINET_LIC,
          "carv4, sa, dil; BSDS500. Authors: commercial use should contact them"),
    _file("pidinet_small", "pidinet", "table5_pidinet-small.pth", _PIDINET + "table5_pidinet-small.pth",
          "", _PIDINET_LIC, "carv4, sa, dil; sha256 not recorded (logged on download)"),
    _file("pidinet_tiny", "pidinet", "table5_pidinet-tiny.pth", _PIDINET + "table5_pidinet-tiny.pth",
          "", _PIDINET_LIC, "carv4, sa, dil; sha256 not recorded (logged on download)"),
    _hf("depth_anything_small", "depth_anything", "depth-anything/Depth-Anything-V2-Small-hf", "Apache-2.0"),
    _hf("depth_anything_base", "depth_anything", "depth-anything/Depth-Anything-V2-Base-hf", "CC-BY-NC-4.0"),
    _hf("depth_anything_large", "depth_anything", "depth-anything/Depth-Anything-V2-Large-hf", "CC-BY-NC-4.0"),
    _file("vgg19", "torchvision", "vgg19-dcbb9e9d.pth", _TV + "vgg19-dcbb9e9d.pth", "dcbb9e9d",
          "BSD-3-Clause", _TV_NOTE),
    _file("vgg16", "torchvision", "vgg16-397923af.pth", _TV + "vgg16-397923af.pth", "397923af",
          "BSD-3-Clause", _TV_NOTE),
    _file("alexnet", "torchvision", "alexnet-owt-7be5be79.pth", _TV + "alexnet-owt-7be5be79.pth", "7be5be79",
          "BSD-3-Clause", _TV_NOTE),
    _file("squeezenet1_1", "torchvision", "squeezenet1_1-b8a52dc0.pth", _TV + "squeezenet1_1-b8a52dc0.pth",
          "b8a52dc0", "BSD-3-Clause", _TV_NOTE),
    _file("resnet18", "torchvision", "resnet18-f37072fd.pth", _TV + "resnet18-f37072fd.pth", "f37072fd",
          "BSD-3-Clause", _TV_NOTE),
    _file("resnet34", "torchvision", "resnet34-b627a593.pth", _TV + "resnet34-b627a593.pth", "b627a593",
          "BSD-3-Clause", _TV_NOTE),
    _file("resnet50", "torchvision", "resnet50-0676ba61.pth", _TV + "resnet50-0676ba61.pth", "0676ba61",
          "BSD-3-Clause", _TV_NOTE),
    _file("wide_resnet50_2", "torchvision", "wide_resnet50_2-95faca4d.pth", _TV + "wide_resnet50_2-95faca4d.pth",
          "95faca4d", "BSD-3-Clause", _TV_NOTE),
    _file("lpips_vgg", "lpips", "v0.1/vgg.pth", _LPIPS + "vgg.pth",
          "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", "BSD-2-Clause"),
    _file("lpips_alex", "lpips", "v0.1/alex.pth", _LPIPS + "alex.pth",
          "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0", "BSD-2-Clause"),
    _file("lpips_squeeze", "lpips", "v0.1/squeeze.pth", _LPIPS + "squeeze.pth",
          "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76", "BSD-2-Clause"),
    _file("inception_is", "inception", "pt_inception-2015-12-05-6726825d.pth",
          "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
          "weights-inception-2015-12-05-6726825d.pth", "6726825d", "Apache-2.0",
          "torch-fidelity Inception-v3; sha256 field is the hash prefix from the file name"),
    _hf("dinov2_small", "dinov2", "facebook/dinov2-small", "Apache-2.0"),
    _hf("dinov2_base", "dinov2", "facebook/dinov2-base", "Apache-2.0"),
    _hf("dinov2_large", "dinov2", "facebook/dinov2-large", "Apache-2.0"),
    _hf("dinov2_giant", "dinov2", "facebook/dinov2-giant", "Apache-2.0"),
    _hf("sam_vit_base", "sam", "facebook/sam-vit-base", "Apache-2.0",
        "Segment Anything ViT-B: AnomalyFactory's semantic regions (hybrid.regions)"),
]}


def get_spec(name: str) -> WeightSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def offline() -> bool:
    """True when HYBRID_OFFLINE or HF_HUB_OFFLINE is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HYBRID_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRID_CACHE_DIR") or Path.home() / ".cache" / "hybrid").expanduser()


def search_roots() -> list[tuple[str, Path]]:
    """(source label, root) in lookup order, after an explicit path: model dir, then user cache."""
    roots = [("model_dir", Path(os.environ["HYBRID_MODEL_DIR"]).expanduser())] \
        if os.environ.get("HYBRID_MODEL_DIR") else []
    return roots + [("cache", cache_dir())]


def _present(spec: WeightSpec, p: Path) -> bool:
    return (p / "config.json").is_file() if spec.kind == "hf" else p.is_file()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_ok(spec: WeightSpec, digest: str) -> bool:
    return not spec.sha256 or digest.startswith(spec.sha256.lower())


def verify_file(spec: WeightSpec, path: Path) -> None:
    """Raise ChecksumError unless ``path`` matches ``spec.sha256`` (full digest or prefix)."""
    digest = sha256_of(path)
    if not _checksum_ok(spec, digest):
        raise ChecksumError(f"{path} has sha256 {digest}, but {spec.name} should have {spec.sha256}; "
                            f"delete or replace it (`hybrid models fetch {spec.name}` re-downloads)")


def _missing_message(spec: WeightSpec, reason: str) -> str:
    where = " or ".join(str(root / spec.relpath) for _, root in search_roots())
    get = (f"Save a snapshot of the Hugging Face repo {spec.hub_id} (a directory with config.json)"
           if spec.kind == "hf" else f"Download {spec.url}")
    return (f"pretrained weights {spec.name!r} ({spec.filename}) not found and {reason}. {get} as {where} "
            f"(or pass its path explicitly), or run `hybrid models fetch {spec.name}` on a machine with "
            f"internet access and copy its {spec.family}/ folder into $HYBRID_MODEL_DIR.")


def locate(name: str, path: str | Path | None = None, verify: bool | None = None) -> Path:
    """The local file (or HF directory) of a registered weight; see the module docstring for the order.

    ``verify``: checksum a file found in the model dir or cache; None = only files under 50 MB.
    Downloaded files are always checked.
    """
    spec = get_spec(name)
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise MissingWeightsError(f"the path given for {name!r} does not exist: {p}")
        return p
    for _, root in search_roots():
        p = root / spec.relpath
        if _present(spec, p):
            if spec.kind == "file" and (verify or (verify is None and p.stat().st_size < VERIFY_MAX_BYTES)):
                verify_file(spec, p)
            return p
    if offline():
        raise MissingWeightsError(_missing_message(spec, "downloads are off (HYBRID_OFFLINE/HF_HUB_OFFLINE)"))
    dest = cache_dir() / spec.relpath
    try:
        return download_hf(spec, dest) if spec.kind == "hf" else download_file(spec, dest)
    except _download_errors() as e:
        raise MissingWeightsError(_missing_message(spec, f"the download failed ({e})")) from e


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, urllib.error.URLError, ValueError]
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:
        return tuple(errors)
    extra = [getattr(hf_errors, n) for n in ("HTTPError", "XetDownloadError") if hasattr(hf_errors, n)]
    return tuple(errors + extra)


def download_file(spec: WeightSpec, dest: Path) -> Path:
    """Download ``spec.url`` to ``dest`` via a temp name, checking the sha256 before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    log.info("downloading %s from %s to %s", spec.name, spec.url, dest)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as r, open(tmp, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=spec.name) as bar:
            for block in iter(lambda: r.read(2**20), b""):
                f.write(block)
                h.update(block)
                bar.update(len(block))
        digest = h.hexdigest()
        if not _checksum_ok(spec, digest):
            raise ChecksumError(f"download of {spec.name} from {spec.url} has sha256 {digest}, expected "
                                f"{spec.sha256}; the file was deleted (retry, or check the URL)")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if not spec.sha256:
        log.warning("no checksum registered for %s; downloaded file %s has sha256 %s", spec.name, dest, digest)
    log.info("downloaded %s (%d bytes, sha256 %s)", dest, dest.stat().st_size, digest)
    return dest


def download_hf(spec: WeightSpec, dest: Path) -> Path:
    """Snapshot ``spec.hub_id`` into the directory ``dest`` (via a temp directory, renamed when complete)."""
    from huggingface_hub import snapshot_download

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    log.info("downloading %s (Hugging Face %s) to %s", spec.name, spec.hub_id, dest)
    try:
        snapshot_download(repo_id=spec.hub_id, local_dir=tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s to %s", spec.hub_id, dest)
    return dest


def status() -> list[dict]:
    """One row per registered weight: name, family, present, path, source, licence."""
    rows = []
    for spec in REGISTRY.values():
        found = [(label, root / spec.relpath) for label, root in search_roots()
                 if _present(spec, root / spec.relpath)]
        label, p = found[0] if found else ("", cache_dir() / spec.relpath)
        rows.append({"name": spec.name, "family": spec.family, "present": bool(found), "path": str(p),
                     "source": label, "licence": spec.licence})
    return rows


def hf_model_dir(name_or_dir: str | Path, prefix: str, what: str) -> Path:
    """A Hugging Face model directory: an existing ``save_pretrained`` folder, or a registered name
    starting with ``prefix`` (e.g. ``dinov2_``) located through the store. ``what`` names the
    upstream files in errors (e.g. "facebook/dinov2-*")."""
    path = Path(name_or_dir)
    if not path.is_dir():
        names = sorted(n for n in REGISTRY if n.startswith(prefix))
        if str(name_or_dir) not in names:
            raise ValueError(f"model {str(name_or_dir)!r} is neither a directory nor a model-store name; pass a "
                             f"save_pretrained directory or one of {names}")
        path = Path(locate(str(name_or_dir)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; it must be a Hugging Face model directory "
                                f"(the files of {what}, or a save_pretrained output)")
    return path


def fetch_to_manifest(names: list[str], paths: dict[str, str], manifest: str | Path) -> dict[str, str]:
    """Make ``names`` present (explicit ``paths`` win) and write {name: path} as JSON, atomically."""
    from hybrid.io import write_json_atomic

    missing = [n for n in names if n not in paths]
    found = {n: str(p) for n, p in zip(missing, fetch(missing))} if missing else {}
    found.update({n: str(locate(n, paths[n])) for n in names if n in paths})
    write_json_atomic(manifest, found)
    return found


def format_status(rows: list[dict] | None = None) -> str:
    """A text table of ``status()`` for ``hybrid models list``."""
    rows = status() if rows is None else rows
    cols = ["name", "present", "source", "licence", "path"]
    cells = [[str(r[c]) if c != "present" else ("yes" if r[c] else "no") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def fetch(names: list[str] | None = None) -> list[Path]:
    """Make the named weights (all registered ones when None) present locally; raise if any failed."""
    names = list(REGISTRY) if not names else names
    specs = [get_spec(n) for n in names]
    paths, failures = [], []
    for spec in specs:
        try:
            paths.append(locate(spec.name))
        except (MissingWeightsError, ChecksumError) as e:
            failures.append(f"{spec.name}: {e}")
    if failures:
        raise MissingWeightsError(f"could not fetch {len(failures)} model(s):\n" + "\n".join(failures))
    return paths



def resolve_mode(name: str, mode: str, path: str | Path | None = None, what: str = "") -> Path | None:
    """The weight policy every stage's ``weights: auto | real | random`` follows, in one place.

    ``real``: the file of ``name`` (``path`` or the store's lookup), else MissingWeightsError naming
    it and how to fetch it. ``auto``: the file when it is here, else None with a warning that a
    random stand-in is used (numbers not comparable to papers). ``random``: None.
    """
    from hybrid.config import WEIGHT_MODES

    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights {mode!r}: use one of {', '.join(WEIGHT_MODES)}")
    if mode == "random":
        return None
    try:
        return locate(name, path)
    except MissingWeightsError as e:
        if mode == "real":
            raise
        log.warning("%s: weights not found, using a RANDOM STAND-IN%s; its numbers are not comparable to papers "
                    "(set weights: real to fail instead). %s", name, f" {what}" if what else "", e)
        return None


def present(name: str, paths: Mapping[str, str] | None = None) -> Path | None:
    """The file of a registered weight if it is already here (an explicit path, or a search root);
    never downloads."""
    paths = dict(paths or {})
    if paths.get(name):
        p = Path(paths[name]).expanduser()
        return p if p.exists() else None
    spec = get_spec(name)

    def here(p: Path) -> bool:
        return (p / "config.json").is_file() if spec.kind == "hf" else p.is_file()

    return next((root / spec.relpath for _, root in search_roots() if here(root / spec.relpath)), None)
