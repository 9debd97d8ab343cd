# Pretrained weights: `snakemake fetch_models` on a machine with internet (a cluster's login node)
# downloads every weight the configured stages need into the model store's cache, so that jobs on
# offline compute nodes find them. Not part of `all`: stages fail at once, naming the file and
# where to put it, when a weight is missing.


rule fetch_models:
    output:
        "resources/models.json",
    log:
        "results/logs/fetch_models.log",
    localrule: True
    conda:
        "../envs/hybrid.yaml"
    params:
        names=needed_weights(),
        paths=model_paths(),
    script:
        "../workflow/scripts/fetch_models.py"
