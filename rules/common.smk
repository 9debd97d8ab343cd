# Shared helpers: config validation, the code hash that reruns stages when hybrid/ changes.

import ast
import hashlib
from pathlib import Path

import yaml
from snakemake.utils import validate

from hybrid.autoconf import ConfigError, all_industrial, check_config, dataset_entries, resolve_auto, schema_errors


def _coerce(value, schema):
    """Snakemake parses nested `--config key='{...}'` values as strings: turn them into the
    integers, numbers, booleans and nulls the schema asks for, so every key can be overridden."""
    kind = "object" if isinstance(value, dict) else "array" if isinstance(value, list) else None
    branch = [b for b in schema.get("oneOf", []) if b.get("type") == kind]  # `dataset`: a mapping or a list
    if kind and len(branch) == 1:
        schema = branch[0]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {k: _coerce(v, props.get(k, extra if isinstance(extra, dict) else {})) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce(v, schema.get("items", {})) for v in value]
    if not isinstance(value, str):
        return value
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "null" in types and value in ("null", "None", "~", ""):
        return None
    for kind, parse in (("integer", int), ("number", float)):
        if kind in types:
            try:
                return parse(value)
            except ValueError:
                pass
    if "boolean" in types and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


SCHEMA = yaml.safe_load((Path(workflow.basedir) / "config" / "schema.yaml").read_text())
config.update(_coerce(dict(config), SCHEMA))
# Schema mistakes as one line each (key, problem, allowed values), not the whole schema.
_schema_errors = schema_errors(config, SCHEMA, "config/schema.yaml")
if _schema_errors:
    raise ConfigError("the configuration does not match the schema:\n  - " + "\n  - ".join(_schema_errors))
validate(config, "../config/schema.yaml")
# `auto` settings follow the data (hybrid/autoconf.py); then every cross-field rule is checked
# here, before any job, so a mistake never costs a job's previous outputs.
_resolved, AUTO_NOTES = resolve_auto(config)
config.update(_resolved)
check_config(config, "results/manifest.parquet")

REPO = Path(workflow.basedir)
PACKAGE = REPO / "hybrid"


def _module_file(name):
    """hybrid.a.b -> hybrid/a/b.py or hybrid/a/b/__init__.py (None if not ours)."""
    base = REPO.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _hybrid_imports(path):
    """Every hybrid module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "hybrid" or n.startswith("hybrid.")}


def code_hash(*modules):
    """sha256 of the named hybrid modules and everything in hybrid/ they import, transitively.

    Given to each rule as params.code, so editing hybrid/models/generator.py reruns train and
    its descendants but not ingest.
    """
    seen, todo = {}, list(modules)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen.values():
            continue
        seen[name] = path
        todo.extend(_hybrid_imports(path))
    h = hashlib.sha256()
    for path in sorted(set(seen.values())):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_paths():
    return dict(config["models"].get("paths") or {})


def texture_input():
    """The baselines' texture folder as an input (new or changed textures rerun the rule); one that
    does not exist is left to the stage, whose error names baselines.perlin.textures."""
    textures = config["baselines"]["perlin"].get("textures")
    return textures if textures and Path(textures).is_dir() else []


def stage_enabled(section):
    """A stage's `enabled`: true / false as given; auto (the default) = on when every dataset layout
    is an industrial one."""
    value = config[section]["enabled"]  # the schema requires it
    if value == "auto":
        return all_industrial(config)
    return bool(value)


# --- data -----------------------------------------------------------------------------------

DEMO_DIR = "results/data/demo"


def ingest_inputs(wildcards):
    """Per dataset (`dataset` is one mapping or a list, hybrid.autoconf.dataset_entries): the demo's
    CSVs (or the industrial demo's demo.json), or the dataset's own CSVs where the layout has them."""
    inputs = []
    for entry in dataset_entries(config):
        if entry["layout"] == "demo":
            inputs += [f"{DEMO_DIR}/butterfly_anomaly_train.csv", f"{DEMO_DIR}/ref_test.csv"]
        elif entry["layout"] == "demo_industrial":
            inputs.append(f"{DEMO_INDUSTRIAL_DIR}/demo.json")
        else:
            opts = entry["options"]
            inputs += [c for c in [opts.get("train_csv"), *(opts.get("reference_csvs") or {}).values()] if c]
    return list(dict.fromkeys(inputs))


def reader_options(entry=None):
    """A dataset entry's reader keyword arguments (default: the first entry's): the demo is read by the
    Heliconius reader from DEMO_DIR, the industrial demo by its reader (mvtec_ad plus height maps) from
    DEMO_INDUSTRIAL_DIR (rules/data.smk)."""
    entry = entry or dataset_entries(config)[0]
    if entry["layout"] == "demo":
        return {
            "image_dir": f"{DEMO_DIR}/images",
            "train_csv": f"{DEMO_DIR}/butterfly_anomaly_train.csv",
            "reference_csvs": {"test": f"{DEMO_DIR}/ref_test.csv"},
            "depth_dir": f"{DEMO_DIR}/depth",
        }
    if entry["layout"] == "demo_industrial":
        return {"root": DEMO_INDUSTRIAL_DIR}
    return dict(entry["options"])


def ingest_datasets():
    """The ingest rule's `datasets`: config `dataset` (a mapping or a list) with each entry's reader
    options resolved (hybrid.stages.ingest.run)."""
    ds = config["dataset"]
    resolved = [
        {**({"name": e["name"]} if e.get("name") else {}), "layout": e["layout"], "options": reader_options(e)}
        for e in (ds if isinstance(ds, list) else [ds])
    ]
    return resolved if isinstance(ds, list) else resolved[0]


# --- classify -----------------------------------------------------------------------------


def classify_reference():
    """The reference CSV to score against: classify.reference_csv, else the dataset's reference
    CSV for classify.split (the demo's ref_test.csv); None for layouts without one (in a dataset list:
    the one butterfly dataset's; none when there are several)."""
    section = config["classify"]
    if section.get("reference_csv"):  # null or absent: the dataset's own
        return section.get("reference_csv")
    butterflies = [e for e in dataset_entries(config) if e["layout"] in ("demo", "heliconius")]
    if len(butterflies) != 1:
        return None
    return (reader_options(butterflies[0]).get("reference_csvs") or {}).get(section["split"])


CLASSIFY_OUTPUTS = (
    {"json": "results/metrics/classify.json", "table": "results/metrics/classify.parquet"}
    if classify_reference()
    else {}
)


# --- report -------------------------------------------------------------------------------


def report_inputs(wildcards):
    inputs = {
        "manifest": "results/manifest.parquet",
        "index": "results/shards/index.parquet",
        "ingest_skipped": "results/ingest_skipped.csv",
        "losses": "results/train/losses.csv",
        "generated": "results/generated/manifest.parquet",
        "evaluate": "results/metrics/evaluate.json",
    }
    if CLASSIFY_OUTPUTS:
        inputs["classify"] = CLASSIFY_OUTPUTS["json"]
    if SEGMENT_OUTPUTS:  # rules/segment.smk; its strips come with it (same job)
        inputs["segment"] = SEGMENT_OUTPUTS["json"]
    if CLASSIFY_DEFECTS_OUTPUTS:  # rules/classify_defects.smk
        inputs["classify_defects"] = CLASSIFY_DEFECTS_OUTPUTS["json"]
    if BASELINES_OUTPUTS:  # rules/baselines.smk
        inputs["baselines"] = BASELINES_OUTPUTS["manifest"]
    if FEWSHOT_OUTPUTS:  # rules/fewshot.smk
        inputs["fewshot"] = FEWSHOT_OUTPUTS["json"]
    if AF_OUTPUTS:  # rules/anomalyfactory.smk: Blaze localisation (its strips come with it)
        inputs["localize"] = AF_OUTPUTS["localize"]
    return inputs


# --- models -------------------------------------------------------------------------------


def needed_weights():
    """Model-store names the configured stages will load (for the fetch_models rule)."""
    names = []
    pre = config["preprocess"]
    if pre["edge_model"].startswith("pidinet"):
        names.append(pre["edge_model"])
    if pre["depth_source"].startswith("depth_anything"):
        names.append(pre["depth_source"])
    # Every key read here is required by the schema (tests/test_config_truth.py): no default repeated.
    if config["train"]["perceptual"] == "vgg19":
        names.append("vgg19")
    ev = config["evaluate"]
    if ev["weights"] != "random":
        net = ev["lpips_net"]
        names += ["inception_is", {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}[net], f"lpips_{net}"]
    cl = config["classify"]
    if CLASSIFY_OUTPUTS and cl["weights"] != "random" and cl["model"].startswith("dinov2_"):
        names.append(cl["model"])
    fs = config["fewshot"]
    if FEWSHOT_OUTPUTS and fs["weights"] != "random":
        names.append(fs["backbone"])
    cd = config["classify_defects"]
    if CLASSIFY_DEFECTS_OUTPUTS and cd["weights"] != "random":
        names.append(cd["arch"])
    sam = config["anomalyfactory"]["sam"]["model"]
    if AF_OUTPUTS and AF_SEMANTIC and not Path(sam).is_dir():  # rules/anomalyfactory.smk
        names.append(sam)
    names += config["models"].get("fetch") or []
    return sorted(set(names))
