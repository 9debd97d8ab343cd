# Report: one self-contained HTML page from the result files (no metric is recomputed here).


rule report:
    input:
        unpack(report_inputs),
    output:
        html=report("results/report/index.html", caption="../workflow/report/report_html.rst", category="Report"),
    log:
        "results/logs/report.log",
    conda:
        "../envs/hybrid.yaml"
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        config=config,
        auto=AUTO_NOTES,
        code=code_hash("hybrid.stages.report"),
    script:
        "../workflow/scripts/report.py"
