"""Settings that follow the data, and the config checks run before any job.

The workflow calls :func:`resolve_auto` and :func:`check_config` when it builds its DAG, so a
mistake fails at once, naming its keys, instead of inside a job (where Snakemake deletes the
job's previous outputs). Nothing here imports torch: the Snakefile is parsed for every job.

``dataset`` is one ``{layout, options}`` mapping or a list of them merged into one manifest
(:func:`dataset_entries` gives both as a list; every layout-aware default below considers all the
layouts). ``auto`` values, resolved per dataset layout and per what is present on this machine:

- ``preprocess.edge_model``: PiDiNet (the paper's) when its weights are found, else Canny.
- ``preprocess.depth_source``: the dataset's own depth where every layout has it (MVTec 3D-AD's
  sensor depth, the demos' height maps, a Heliconius ``depth_dir``), else Depth Anything V2 Small
  when its weights are found, else none.
- ``model.conditions`` / ``model.decoders``: the AnomalyHybrid conditions the maps allow; without
  depth, AHD (which follows depth) is dropped and the model is AnomalyFactory-shaped (AHE only).
- ``generate.global.pairing``: the butterflies' parent groups when every layout is a butterfly one,
  random pairs within a category elsewhere.
- ``generate.local.source``: the industrial protocol's base-set defects when every layout has defect
  types (and ``ingest.protocol.enabled``), drawn regions otherwise.
- a stage's ``enabled: auto``: on when every layout is industrial (``rules/common.smk``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

BUTTERFLY_LAYOUTS = ("demo", "heliconius")
INDUSTRIAL_LAYOUTS = ("mvtec_ad", "mvtec_3d", "mvtec_loco", "visa", "folder", "demo_industrial", "madsim", "realiad")
OWN_DEPTH = {"demo": "dataset", "demo_industrial": "dataset", "mvtec_3d": "sensor"}
RGB_CONDITIONS = ["reference_image", "target_depth", "target_edge"]
GUIDES = {"AHD": "target_depth", "AHE": "target_edge"}  # the rgb level's roles (hybrid.models.generator)


class ConfigError(ValueError):
    """A configuration mistake found before any job ran; the message names the keys and the fix."""


def dataset_entries(config: Mapping) -> list[dict]:
    """``dataset`` as a list of ``{"name", "layout", "options"}`` (one entry for the single mapping);
    ``name`` defaults to the layout and must be unique (it is the manifest's ``dataset`` value)."""
    ds = config["dataset"]
    out = [{"name": str(e.get("name") or e["layout"]), "layout": e["layout"], "options": dict(e.get("options") or {})}
           for e in (ds if isinstance(ds, list) else [ds])]
    names = [e["name"] for e in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"dataset: the names {dup} are used by more than one entry of the dataset list; give each "
                          "entry its own `name` (the manifest's dataset value, default the layout), e.g. "
                          "{layout: mvtec_ad, name: mvtec_ad_2, options: {...}}")
    return out


def dataset_layouts(config: Mapping) -> list[str]:
    """The layouts of ``dataset``, one per entry (a list of one for the single mapping)."""
    return [e["layout"] for e in dataset_entries(config)]


def all_industrial(config: Mapping) -> bool:
    """Whether every dataset layout has defect types (stages' ``enabled: auto``, ``local.source``)."""
    return all(layout in INDUSTRIAL_LAYOUTS for layout in dataset_layouts(config))


def own_depth(entry: Mapping) -> str | None:
    """The depth_source that reads a dataset entry's own depth (sensor / dataset), or None."""
    if entry["layout"] == "heliconius":
        return "dataset" if entry["options"].get("depth_dir") else None
    return OWN_DEPTH.get(entry["layout"])


def weights_present(name: str, paths: Mapping[str, str]) -> bool:
    """Whether the model store would find ``name`` here without downloading."""
    from hybrid.models import store

    return store.present(name, paths) is not None


def resolve_auto(config: Mapping) -> tuple[dict, list[str]]:
    """A copy of ``config`` with every ``auto`` resolved, and one note per resolution."""
    cfg = copy.deepcopy(dict(config))
    notes: list[str] = []
    entries = dataset_entries(cfg)
    layouts = [e["layout"] for e in entries]
    what = f"the {layouts[0]} layout's" if len(entries) == 1 else "every dataset's"
    paths = (cfg.get("models") or {}).get("paths") or {}
    pre = cfg["preprocess"]
    if pre.get("edge_model") == "auto":
        found = weights_present("pidinet", paths)
        pre["edge_model"] = "pidinet" if found else "canny"
        notes.append("preprocess.edge_model: auto -> " + ("pidinet (its weights are present)" if found else
                     "canny (no PiDiNet weights here; `hybrid models fetch pidinet` gives the paper's edges)"))
    if pre.get("depth_source") == "auto":
        owns = [own_depth(e) for e in entries]
        # sensor and dataset both read the manifest's depth_path; a list mixing them takes sensor
        own = None if None in owns else owns[0] if len(set(owns)) == 1 else "sensor"
        if own:
            pre["depth_source"], why = own, f"{what} own depth"
        elif weights_present("depth_anything_small", paths):
            pre["depth_source"], why = "depth_anything_small", "its weights are present"
        else:
            pre["depth_source"], why = "none", (("no depth in this layout" if len(entries) == 1 else
                                                 "not every dataset has depth of its own")
                                                + " and no Depth Anything V2 weights here; "
                                                "`hybrid models fetch depth_anything_small` adds depth")
        notes.append(f"preprocess.depth_source: auto -> {pre['depth_source']} ({why})")
    model = cfg["model"]
    available = {"target_depth": pre["depth_source"] != "none", "target_edge": pre["edge_model"] != "none"}
    if model.get("conditions") in ("auto", None) and model.get("level", "rgb") == "rgb":
        model["conditions"] = [c for c in RGB_CONDITIONS if available.get(c, True)]
        notes.append(f"model.conditions: auto -> {model['conditions']}")
    if model.get("decoders") == "auto":
        conds = model.get("conditions") or RGB_CONDITIONS
        model["decoders"] = [d for d, guide in GUIDES.items() if guide in conds]
        notes.append(f"model.decoders: auto -> {model['decoders']}"
                     + ("" if "AHD" in model["decoders"] else " (no depth: AHD, which follows depth, is left out)"))
    gen = cfg["generate"]
    glob = gen.get("global") or {}
    if glob.get("pairing") == "auto":
        butterflies = all(x in BUTTERFLY_LAYOUTS for x in layouts)
        glob["pairing"] = "groups" if butterflies and glob.get("groups") else "random"
        notes.append(f"generate.global.pairing: auto -> {glob['pairing']}"
                     + (" (the butterflies' parent groups)" if glob["pairing"] == "groups" else
                        " (reference and target from one category)"))
    local = gen.get("local") or {}
    if local.get("source") == "auto":
        protocol = (cfg.get("ingest") or {}).get("protocol") or {}
        base = all(x in INDUSTRIAL_LAYOUTS for x in layouts) and protocol.get("enabled", True)
        local["source"] = "base" if base else "select"
        notes.append(f"generate.local.source: auto -> {local['source']}"
                     + (" (the industrial protocol: base-set defects and their masks)" if base else
                        " (regions drawn on generate.select's images)"))
    return cfg, notes


# ----------------------------------------------------------------------------- checks
def discriminator_sizes(size: int, n_layers: int, num_D: int) -> list[list[int]]:
    """Spatial size of every normalised layer of the pix2pixHD multi-scale discriminator, per scale."""
    out = []
    for _ in range(num_D):
        s, sizes = size, []
        for i in range(n_layers + 1):
            s = s // 2 + 1 if i < n_layers else s + 1  # k4 p2: stride 2, then one stride-1 layer
            if i > 0:
                sizes.append(s)
        out.append(sizes)
        size = (size - 1) // 2 + 1  # AvgPool2d(3, 2, padding 1) to the next scale
    return out


def check_config(cfg: Mapping, manifest: str | Path | None = None) -> list[str]:
    """Every cross-field rule of a resolved config; raises ConfigError listing all broken ones.
    With ``manifest`` (an existing ingest output of this layout) the filters are checked against it.
    Returns warnings that do not stop the run."""
    errors: list[str] = []
    warnings: list[str] = []
    pre, model, train = cfg["preprocess"], cfg["model"], cfg["train"]
    res, n = int(pre["resolution"]), int(model.get("n_downsample", 4))
    if res % 2**n or res // 2**n < 2:
        ok = [m * 2**n for m in range(2, 9)]
        errors.append(f"preprocess.resolution {res} does not suit model.n_downsample {n}: the generator halves the "
                      f"image {n} times and needs a multiple of {2**n} of at least {2 * 2**n} (e.g. {ok[:4]}); "
                      "change one of the two")
    sizes = discriminator_sizes(res, int(train.get("n_layers_D", 3)), int(train.get("num_D", 2)))
    if any(s < 2 for scale in sizes for s in scale):
        errors.append(f"train.num_D {train.get('num_D', 2)} / train.n_layers_D {train.get('n_layers_D', 3)} are "
                      "too deep "
                      f"for preprocess.resolution {res} (the discriminator's smallest maps would be 1 pixel): "
                      "lower num_D or n_layers_D, or raise the resolution")
    for section in ("train", "train_depth"):
        sec = {**train, **cfg.get(section, {})} if section == "train_depth" else train
        if section == "train_depth" and not cfg.get("train_depth", {}).get("enabled"):
            continue
        if int(sec.get("epochs", 0)) + int(sec.get("epochs_decay", 0)) < 1:
            total = int(sec.get('epochs', 0)) + int(sec.get('epochs_decay', 0))
            errors.append(f"{section}.epochs + {section}.epochs_decay is {total}: "
                          "at least one epoch is needed")
    conditions = model.get("conditions") or RGB_CONDITIONS
    needs = {"target_depth": ("preprocess.depth_source", pre["depth_source"]),
             "target_edge": ("preprocess.edge_model", pre["edge_model"])}
    for cond, (key, value) in needs.items():
        if model.get("level", "rgb") == "rgb" and cond in conditions and value == "none":
            errors.append(f"model.conditions has {cond}, but {key} is none: set {key} (or auto), or drop {cond} "
                          "from model.conditions (and AHD / AHE from model.decoders)")
    for d in model.get("decoders") or []:
        if d in GUIDES and model.get("level", "rgb") == "rgb" and GUIDES[d] not in conditions:
            errors.append(f"model.decoders has {d}, which follows {GUIDES[d]}, not among model.conditions {conditions}")
    if cfg.get("train_depth", {}).get("enabled") and "none" in (pre["depth_source"], pre["edge_model"]):
        errors.append("train_depth.enabled needs depth and edges (AnomalyHybrid* learns both): set "
                      "preprocess.depth_source and preprocess.edge_model, or train_depth.enabled: false")
    if os.environ.get("HYBRID_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        paths = (cfg.get("models") or {}).get("paths") or {}
        wanted = [v for v in (pre["edge_model"], pre["depth_source"]) if v.startswith(("pidinet", "depth_anything"))]
        if train.get("perceptual", "vgg19") == "vgg19" and not train.get("vgg_path"):
            wanted.append("vgg19")
        missing = [w for w in wanted if not weights_present(w, paths)]
        if missing:
            errors.append(f"HYBRID_OFFLINE is set and the weights of {missing} are not here: run `hybrid models fetch "
                          f"{' '.join(missing)}` where there is internet and copy them into $HYBRID_MODEL_DIR, give "
                          "models.paths, or use preprocess.edge_model / depth_source: auto")
    names = [e["name"] for e in dataset_entries(cfg)]
    for kind in ("global", "local", "normal"):
        pc = (cfg.get("generate") or {}).get(kind) or {}
        unknown = [d for d in pc.get("reference_datasets") or [] if d not in names]
        if unknown:
            errors.append(f"generate.{kind}.reference_datasets names {unknown}, which are not datasets of the dataset "
                          f"list {names} (their `name`, default the layout)")
        elif pc.get("reference_datasets") and (pc.get("pairing", "random") != "random"
                                               or pc.get("source", "select") not in ("select", "auto")):
            errors.append(f"generate.{kind}.reference_datasets needs pairing: random and source: select (got pairing "
                          f"{pc.get('pairing')!r}, source {pc.get('source', 'select')!r})")
    af = cfg.get("anomalyfactory") or {}
    for key, values, extra in (("anomalyfactory.quality.references", (af.get("quality") or {}).get("references"),
                                ["self"]), ("anomalyfactory.per_dataset", list(af.get("per_dataset") or {}), [])):
        unknown = [v for v in values or [] if v not in names + extra]
        if unknown and af.get("enabled"):
            errors.append(f"{key} names {unknown}, which are not datasets of the dataset list {names} (their `name`, "
                          "default the layout)" + (" or 'self'" if extra else ""))
    if manifest is not None and Path(manifest).exists():
        errors += _check_filters(cfg, Path(manifest))
    if errors:
        raise ConfigError("the configuration cannot run:\n  - " + "\n  - ".join(errors))
    return warnings


def _check_filters(cfg: Mapping, path: Path) -> list[str]:
    """train.select, generate.select and the generate groups against an existing manifest of these
    datasets (a manifest of other datasets is stale and not checked)."""
    import pandas as pd

    from hybrid.data.manifest import matches

    rows = pd.read_parquet(path)
    if set(rows["dataset"].astype(str)) != {e["name"] for e in dataset_entries(cfg)}:
        return []
    errors = []
    filters = [("train.select", cfg["train"].get("select") or {"split": "train", "label": 0}),
               ("generate.select", cfg["generate"].get("select") or {})]
    for kind in ("global", "local", "normal"):
        pc = cfg["generate"].get(kind) or {}
        if kind in cfg["generate"].get("kinds", [kind]) and pc.get("pairing") == "groups":
            filters += [(f"generate.{kind}.groups", f) for g in pc.get("groups") or [] for f in g]
    for key, f in filters:
        try:
            n = int(matches(rows, f, key).sum())
        except ValueError as e:
            errors.append(str(e))
            continue
        if n == 0:
            errors.append(f"{key} {f} matches none of the {len(rows)} rows of {path}; check the values "
                          "(the manifest's columns: " + ", ".join(rows.columns) + ")")
    return errors


def schema_errors(config: Mapping, schema: Mapping, schema_path: str) -> list[str]:
    """Each schema violation as one line: the key, what is wrong, the allowed values, the schema file."""
    import jsonschema

    lines = []
    for e in sorted(_leaf_errors(jsonschema.Draft7Validator(schema).iter_errors(config)),
                    key=lambda e: [str(p) for p in e.absolute_path]):
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        if e.validator == "additionalProperties":
            allowed = sorted((e.schema.get("properties") or {}).keys())
            lines.append(f"{key}: {e.message}; valid keys here are {allowed}")
        elif e.validator == "enum":
            lines.append(f"{key}: {e.instance!r} is not one of {e.validator_value}")
        elif e.validator in ("oneOf", "anyOf"):
            lines.append(f"{key}: {e.instance!r} is not valid here ({_describe(e.schema)})")
        else:
            lines.append(f"{key}: {e.message}")
    return [f"config key {line} (see {schema_path})" for line in lines]


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "")


def _leaf_errors(errors):
    """Errors with a oneOf / anyOf replaced by the errors of its one branch of the value's type (a
    `dataset` list is checked as a list of entries, so a typo in an entry's options is named)."""
    for e in errors:
        if e.validator in ("oneOf", "anyOf"):
            branches = [i for i, b in enumerate(e.validator_value) if b.get("type") == _json_type(e.instance)]
            if len(branches) == 1:
                sub = [c for c in e.context if c.relative_schema_path and c.relative_schema_path[0] == branches[0]]
                if sub:
                    yield from _leaf_errors(sub)
                    continue
        yield e


def _describe(schema: Mapping) -> str:
    parts = []
    for o in schema.get("oneOf") or schema.get("anyOf") or []:
        if "const" in o:
            parts.append(repr(o["const"]))
        elif "enum" in o:
            parts.append(f"one of {o['enum']}")
        else:
            kind = o.get("type", "value")
            parts.append(f"{'an' if str(kind)[0] in 'aeiou' else 'a'} {kind}")
    return "use " + " or ".join(parts)
