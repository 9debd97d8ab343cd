"""Snakemake adapter: write results/report/index.html from the run's result files."""

from hybrid.log import setup_logging
from hybrid.stages.report import run

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
inputs = snakemake.input  # noqa: F821
run(
    snakemake.output.html,  # noqa: F821
    config=snakemake.params.config,  # noqa: F821
    auto_notes=snakemake.params.auto,  # noqa: F821
    manifest=inputs.manifest,
    shard_index=inputs.index,
    ingest_skipped=inputs.ingest_skipped,
    losses_csv=inputs.losses,
    generated_manifest=inputs.generated,
    evaluate_json=inputs.evaluate,
    classify_json=inputs.get("classify"),
    segment_json=inputs.get("segment"),
    baselines_manifest=inputs.get("baselines"),
    fewshot_json=inputs.get("fewshot"),
    classify_defects_json=inputs.get("classify_defects"),
    localize_json=inputs.get("localize"),  # rules/anomalyfactory.smk adds it when anomalyfactory.enabled
)
