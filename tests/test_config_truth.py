"""One source of config truth: config/schema.yaml, config/config.yaml and the rules agree with the
config dataclasses (the stages' own validation).

For every config section a dataclass backs: the schema's keys are the dataclass fields (plus the
documented extra keys), each key's JSON type is the field's annotation, every schema enum is the
choices the dataclass declares (``hybrid.config.choice``: the one place a field's choices live,
checked by its ``__post_init__``), every ``device`` takes auto / cpu / cuda / cuda:N, config.yaml's
values are the dataclass defaults (deliberate demo-sized exceptions listed with their reason), and
the rules read what the schema guarantees instead of repeating defaults with ``.get(key, default)``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from hybrid.augment import AugmentConfig
from hybrid.baselines import CutPasteConfig, PerlinConfig
from hybrid.classify import HeadConfig
from hybrid.config import DEVICE_PATTERN
from hybrid.data.demo import DemoConfig
from hybrid.data.demo_industrial import IndustrialDemoConfig
from hybrid.data.protocol import ProtocolConfig
from hybrid.manipulate import ManipulateConfig
from hybrid.planning import PairingConfig
from hybrid.regions import RegionConfig
from hybrid.stages.baselines import BaselinesConfig
from hybrid.stages.blaze import BlazeConfig
from hybrid.stages.classify import ClassifyStageConfig
from hybrid.stages.classify_defects import ClassifyDefectsConfig
from hybrid.stages.evaluate import EvaluateConfig
from hybrid.stages.export import ExportConfig
from hybrid.stages.fewshot import FewShotConfig
from hybrid.stages.flare import FlareConfig
from hybrid.stages.generate import GenerateConfig
from hybrid.stages.localize import LocalizeConfig
from hybrid.stages.preprocess import PreprocessConfig
from hybrid.stages.segment import SegmentConfig
from hybrid.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
RULES = sorted((REPO / "rules").glob("*.smk")) + [REPO / "Snakefile"]

PATHS = "paths"  # models.paths (store name -> explicit weights), added by the rules, not a key of the section
ENABLED = "enabled"  # auto | true | false: read by the workflow (rules/common.smk stage_enabled), not by the stage
AUTO = "auto"  # a value hybrid.autoconf.resolve_auto replaces before any stage sees the section


@dataclasses.dataclass(frozen=True)
class Section:
    """A config section (dotted path in config.yaml / schema.yaml) backed by one or more dataclasses."""

    path: str
    classes: tuple[type, ...]
    hidden: tuple[str, ...] = ()  # fields that are not keys of this section (set by the rule or a nested section)
    extra: tuple[str, ...] = ()  # keys of the section that are not fields (documented in SECTIONS)
    keys: Mapping[str, str] | None = None  # schema key -> field name, where they differ
    auto: tuple[str, ...] = ()  # keys whose schema enum adds "auto", resolved by hybrid.autoconf first
    subset: bool = False  # the section overrides some fields of the classes (no defaults of its own)

    def fields(self) -> dict[str, dataclasses.Field]:
        """Schema key -> dataclass field."""
        out = {}
        for cls in self.classes:
            for f in dataclasses.fields(cls):
                if f.name not in self.hidden:
                    out[f.name] = f
        if self.keys is not None:
            return {key: out[name] for key, name in self.keys.items()}
        return out

    def owner(self, key: str) -> type:
        name = (self.keys or {}).get(key, key)
        return next(c for c in self.classes if name in {f.name for f in dataclasses.fields(c)})

    def __str__(self) -> str:
        return self.path


SECTIONS = [
    # demo.industrial is the industrial demo's own section (below).
    Section("demo", (DemoConfig,), extra=("industrial",)),
    Section("demo.industrial", (IndustrialDemoConfig,)),
    # ingest.missing is an argument of hybrid.stages.ingest.run; only the protocol is a dataclass.
    Section("ingest.protocol", (ProtocolConfig,)),
    Section("preprocess", (PreprocessConfig,), hidden=(PATHS,), auto=("edge_model", "depth_source")),
    # train.select: the rows to learn from, passed to the stage on its own (hybrid.stages.train.run select=).
    Section("train", (TrainConfig,), extra=("select",)),
    # train_depth overrides these train keys for AnomalyHybrid* (the rule merges it over train).
    Section("train_depth", (TrainConfig,), extra=(ENABLED,), subset=True),
    Section("augment", (AugmentConfig,)),
    # generate.global / local / normal are PairingConfig sections (below), gathered in `pairings`.
    Section("generate", (GenerateConfig,), hidden=("pairings",), extra=("global", "local", "normal")),
    *[Section(f"generate.{kind}", (PairingConfig,), auto=("pairing", "source"))
      for kind in ("global", "local", "normal")],
    Section("generate.manipulate", (ManipulateConfig,)),
    Section("evaluate", (EvaluateConfig,), hidden=(PATHS,)),
    # classify is flat: the stage's keys and the heads' hyper-parameters (`head`); reference_csv is the
    # rule's input (rules/common.smk classify_reference).
    Section("classify", (ClassifyStageConfig, HeadConfig), hidden=("head", PATHS), extra=("reference_csv",)),
    Section("baselines", (BaselinesConfig,), extra=(ENABLED,)),
    Section("baselines.perlin", (PerlinConfig,)),
    Section("baselines.cutpaste", (CutPasteConfig,)),
    Section("fewshot", (FewShotConfig,), extra=(ENABLED,)),
    Section("classify_defects", (ClassifyDefectsConfig,), hidden=(PATHS,)),
    Section("segment", (SegmentConfig,), extra=(ENABLED,)),
    Section("export", (ExportConfig,)),
    # anomalyfactory.boot overrides these train keys for the BootGenerator (hybrid.stages.boot.run).
    Section("anomalyfactory.boot", (TrainConfig,), subset=True),
    Section("anomalyfactory.flare", (FlareConfig,)),
    Section("anomalyfactory.blaze", (BlazeConfig,)),
    Section("anomalyfactory.sam", (RegionConfig,)),
    # anomalyfactory.quality is LocalizeConfig's quality_* fields (LocalizeConfig.from_dict(localize, quality)).
    Section("anomalyfactory.localize", (LocalizeConfig,),
            hidden=("quality_count", "quality_strategies", "quality_references")),
    Section("anomalyfactory.quality", (LocalizeConfig,),
            keys={"count": "quality_count", "strategies": "quality_strategies", "references": "quality_references"}),
]

# config.yaml values that deliberately differ from the dataclass default, and why.
DEMO = "config.yaml is the CPU-sized demo; the dataclass keeps the paper's value"
EXCEPTIONS = {
    ("preprocess", "resolution"): DEMO,
    ("preprocess", "edge_model"): "auto in config.yaml, resolved by hybrid.autoconf; a stage needs a concrete model",
    ("preprocess", "depth_source"): "auto in config.yaml, resolved by hybrid.autoconf; a stage needs a concrete source",
    ("train", "epochs"): DEMO,
    ("train", "epochs_decay"): DEMO,
    ("train", "batch_size"): DEMO,
    ("train", "lambda_l1"): "the demo trains without VGG19 weights: pixel L1 stands in (not in the paper: 0)",
    ("train", "perceptual"): "the demo runs offline without VGG19 weights (paper: vgg19)",
    ("train", "ndf"): DEMO,
    ("train", "checkpoint_every"): DEMO,
    ("train", "sample_every"): DEMO,
    ("train", "log_every"): DEMO,
    ("augment", "rtp_prob"): "the demo's butterflies are centred: lighter resize-translate-pad",
    ("augment", "flip_tb"): "the demo's butterflies are upright: no top-bottom flips (industrial data: 0.5)",
    ("generate.global", "pairing"): "auto in config.yaml (groups on butterfly layouts), resolved by hybrid.autoconf",
    ("generate.global", "groups"): "the demo's butterfly parent groups",
    ("generate.local", "source"): "auto in config.yaml (base on industrial layouts), resolved by hybrid.autoconf",
    ("generate.normal", "match"): "the demo's butterflies: reference and target of one subspecies",
    ("segment", "base_width"): DEMO,
    ("segment", "variants"): "the demo trains one variant (both = AnoHybrid, Table 2)",
    ("segment", "epochs"): DEMO,
    ("segment", "epoch_length"): DEMO,
    ("anomalyfactory.flare", "batch_size"): DEMO,
    ("anomalyfactory.flare", "region_mix"): "the demo has no SAM weights: stochastic regions only (paper: a mix)",
    ("anomalyfactory.blaze", "batch_size"): DEMO,
}


def schema_at(path: str) -> dict:
    node = SCHEMA
    for part in path.split("."):
        node = node["properties"][part]
    return node


def config_at(path: str) -> dict:
    node = CONFIG
    for part in path.split("."):
        node = node[part]
    return node


def resolve(prop: dict) -> dict:
    ref = prop.get("$ref")
    if ref:
        node = SCHEMA
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return {**node, **{k: v for k, v in prop.items() if k != "$ref"}}
    return prop


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def schema_types(prop: dict) -> set[str]:
    """The JSON types a schema property admits (its `type`, else those of its enum / const / branches)."""
    prop = resolve(prop)
    if "type" in prop:
        t = prop["type"]
        return {t} if isinstance(t, str) else set(t)
    if "enum" in prop:
        return {json_type(v) for v in prop["enum"]}
    if "const" in prop:
        return {json_type(prop["const"])}
    branches = prop.get("oneOf") or prop.get("anyOf")
    if branches:
        return set().union(*(schema_types(b) for b in branches))
    raise AssertionError(f"schema property {prop} has no type")


def annotation_types(hint: object) -> set[str]:
    """The JSON types of a field annotation (Optional adds null, a nested dataclass is an object)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(annotation_types(a) for a in typing.get_args(hint)))
    if hint is type(None):
        return {"null"}
    if hint is bool:
        return {"boolean"}
    if hint is int:
        return {"integer"}
    if hint is float:
        return {"number"}
    if hint is str:
        return {"string"}
    if dataclasses.is_dataclass(hint):
        return {"object"}
    base = origin or hint
    if isinstance(base, type) and issubclass(base, Mapping):
        return {"object"}
    if isinstance(base, type) and issubclass(base, Sequence):
        return {"array"}
    raise AssertionError(f"no JSON type for the annotation {hint!r}")


def hints(cls: type) -> dict[str, object]:
    import sys

    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def schema_enum(prop: dict) -> list | None:
    """The schema's allowed values of a key (or of each item of a list key)."""
    prop = resolve(prop)
    if "enum" in prop:
        return list(prop["enum"])
    if "enum" in prop.get("items", {}):
        return list(prop["items"]["enum"])
    for branch in prop.get("oneOf") or []:  # evaluate.kinds: auto or a list of kinds
        if "enum" in branch.get("items", {}):
            return list(branch["items"]["enum"])
    return None


def same(a: list, b: list) -> bool:
    """Equal as sets, with True / 1 and False / 0 kept apart."""
    def key(v: object) -> tuple:
        return (type(v).__name__, v)
    return sorted(map(key, a)) == sorted(map(key, b))


def plain(value: object) -> object:
    """A default as YAML would write it: tuples as lists, dataclasses as mappings."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


@pytest.mark.parametrize("section", SECTIONS, ids=str)
def test_schema_keys_are_the_dataclass_fields(section):
    props = set(schema_at(section.path)["properties"])
    keys = set(section.fields())
    if section.subset:
        assert props - set(section.extra) <= keys, (
            f"{section}: {sorted(props - set(section.extra) - keys)} are not fields")
    else:
        assert props == keys | set(section.extra), (
            f"{section}: only in config/schema.yaml {sorted(props - keys - set(section.extra))}, only in "
            f"{[c.__name__ for c in section.classes]} {sorted(keys - props)}")
    assert schema_at(section.path).get("additionalProperties") is False, f"{section}: unknown keys must fail"


@pytest.mark.parametrize("section", SECTIONS, ids=str)
def test_schema_types_are_the_annotations(section):
    props = schema_at(section.path)["properties"]
    wrong = {}
    for key, f in section.fields().items():
        if key not in props:
            continue
        want = annotation_types(hints(section.owner(key))[f.name])
        got = schema_types(props[key])
        if got != want:
            wrong[key] = f"schema {sorted(got)} vs annotation {sorted(want)}"
    assert not wrong, f"{section}: {wrong}"


@pytest.mark.parametrize("section", SECTIONS, ids=str)
def test_schema_enums_are_the_dataclass_choices(section):
    props = schema_at(section.path)["properties"]
    wrong = {}
    for key, f in section.fields().items():
        if key not in props:
            continue
        choices = f.metadata.get("choices")
        enum = schema_enum(props[key])
        if enum is None and choices is None:
            continue
        if choices is None:
            wrong[key] = f"the schema lists {enum}, the dataclass declares no choices (hybrid.config.choice)"
        elif enum is None:
            wrong[key] = f"the dataclass accepts {list(choices)}, the schema has no enum"
        elif not same(enum, [*choices, *([AUTO] if key in section.auto else [])]):
            wrong[key] = f"schema {enum} vs dataclass {list(choices)}" + (" + auto" if key in section.auto else "")
    assert not wrong, f"{section}: {wrong}"


@pytest.mark.parametrize("section", SECTIONS, ids=str)
def test_choices_are_checked_by_the_dataclass(section):
    """A value outside a field's choices fails at construction, naming the section and the key (a shared
    dataclass names its own part of the path: manipulate.foreground, generate ... source)."""
    parts = "|".join(map(re.escape, section.path.split(".")))
    for key, f in section.fields().items():
        if not f.metadata.get("choices") or section.subset:
            continue
        value = default(f)
        bad = ["no-such-choice"] if isinstance(value, (list, tuple)) else "no-such-choice"
        with pytest.raises(ValueError, match=rf"\b({parts})\b.*\b{f.name.removeprefix('quality_')}\b"):
            section.owner(key)(**{f.name: bad})


def walk(node: object, path: str = ""):
    """Every (dotted key, property schema) of the schema."""
    if isinstance(node, dict):
        for key, prop in (node.get("properties") or {}).items():
            yield f"{path}{key}", prop
            yield from walk(prop, f"{path}{key}.")
        for key in ("oneOf", "anyOf", "allOf"):
            for branch in node.get(key) or []:
                yield from walk(branch, path)
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], path)


def test_every_device_takes_auto_cpu_cuda_and_cuda_n():
    devices = {key: prop for key, prop in walk(SCHEMA) if key.rsplit(".", 1)[-1] == "device"}
    assert len(devices) >= 9
    wrong = {k: p for k, p in devices.items() if p.get("type") != "string" or p.get("pattern") != DEVICE_PATTERN}
    assert not wrong, f"device keys without type string and pattern {DEVICE_PATTERN}: {wrong}"
    with_device = [s for s in SECTIONS if "device" in s.fields() and not s.subset]
    assert {s.path for s in with_device} == {k.rsplit(".", 1)[0] for k in devices}
    for section in with_device:
        cls = section.owner("device")
        assert cls(device="cuda:1").device == "cuda:1" and cls(device="cpu").device == "cpu"
        for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
            with pytest.raises(ValueError, match=rf"{re.escape(section.path)}\.device"):
                cls(device=bad)


@pytest.mark.parametrize("section", [s for s in SECTIONS if not s.subset], ids=str)
def test_config_yaml_holds_the_dataclass_defaults(section):
    values = config_at(section.path)
    fields = section.fields()
    differ = {}
    for key, value in values.items():
        if key not in fields:
            continue
        want = plain(default(fields[key]))
        if (section.path, key) in EXCEPTIONS:
            assert value != want, f"{section}.{key}: listed as an exception but equals the default {want!r}; unlist it"
        elif value != want and not (isinstance(want, float) and value == pytest.approx(want)):
            differ[key] = f"config.yaml {value!r} vs default {want!r}"
    assert not differ, f"{section}: {differ} (change one, or list a deliberate exception in EXCEPTIONS)"


def test_the_exceptions_name_real_keys():
    paths = {s.path for s in SECTIONS}
    for path, key in EXCEPTIONS:
        assert path in paths and key in next(s for s in SECTIONS if s.path == path).fields(), (path, key)


def rule_text() -> str:
    return "\n".join(p.read_text() for p in RULES)


def section_keys() -> set[str]:
    keys = set()
    for s in SECTIONS:
        keys |= set(s.fields()) | set(s.extra)
    return keys


def test_rules_do_not_repeat_defaults():
    """No `.get("key", default)` of a dataclass-backed section's key in rules/*.smk or the Snakefile."""
    found = [m.group(0) for m in re.finditer(r'\.get\(\s*"(\w+)"\s*,[^)]*\)', rule_text())
             if m.group(1) in section_keys()]
    assert not found, f"rules repeat defaults of the dataclasses: {found}; read the validated section instead"


def test_the_schema_requires_what_the_rules_read():
    """Every config["section"]["key"]... a rule indexes is required by the schema, so the index cannot fail."""
    text = rule_text()
    # AF = config["anomalyfactory"], ev = config["evaluate"]: names for a section
    aliases = dict(re.findall(r'^\s*(\w+) = config\["(\w+)"\]\s*$', text, re.M))
    chains = [["config", *re.findall(r'"(\w+)"', m)] for m in re.findall(r'\bconfig((?:\["\w+"\])+)', text)]
    for alias, section in aliases.items():
        chains += [["config", section, *re.findall(r'"(\w+)"', m)]
                   for m in re.findall(rf'\b{alias}((?:\["\w+"\])+)', text)]
    missing = set()
    for chain in chains:
        node = SCHEMA
        for key in chain[1:]:
            if key not in node.get("required", []):
                missing.add(".".join(chain[1:chain.index(key) + 1]))
                break
            node = resolve(node["properties"][key])
            if "properties" not in node:
                break
    assert not missing, f"rules index these keys, which the schema does not require: {sorted(missing)}"


def test_the_path_overrides_are_called_paths():
    """models.paths (store name -> weights file) reaches every stage as `paths`; `weights` is auto/real/random."""
    for s in SECTIONS:
        for key, f in s.fields().items():
            assert key != "weights" or f.metadata.get("choices") == ("auto", "real", "random"), (s.path, key)
    for cls in (PreprocessConfig, EvaluateConfig, ClassifyStageConfig, ClassifyDefectsConfig):
        assert PATHS in {f.name for f in dataclasses.fields(cls)}, cls
    assert "weights=model_paths()" not in rule_text()


def test_the_model_section_is_the_generators_signature():
    """model has no dataclass of its own: its keys are Generator's constructor arguments, its level
    enum the user-facing levels of ROLES (blaze is AnomalyFactory's, set by its stages), its
    condition and decoder enums the names ROLES and CHANNELS allow."""
    import inspect

    from hybrid.models.generator import CHANNELS, ROLES, Generator

    model = SCHEMA["properties"]["model"]["properties"]
    assert set(model) == set(inspect.signature(Generator).parameters)
    assert set(model["level"]["enum"]) == set(ROLES) - {"blaze"}
    conditions = next(o for o in model["conditions"]["oneOf"] if o.get("type") == "array")["items"]["enum"]
    assert set(conditions) == {f"{side}_{m}" for side in ("reference", "target") for m in CHANNELS}
    decoders = next(o for o in model["decoders"]["oneOf"] if o.get("type") == "array")["items"]["enum"]
    assert set(decoders) == {d for level in ROLES.values() for d in level}
    defaults = {k: p.default for k, p in inspect.signature(Generator).parameters.items()}
    assert CONFIG["model"]["level"] == defaults["level"]
