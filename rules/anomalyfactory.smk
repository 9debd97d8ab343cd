# AnomalyFactory (paper 002): BootGenerator -> FlareGenerator -> BlazeDetector, then Blaze localisation
# on the real test images with the paper's strips, and Boot vs Flare generation quality (Tables 1-2).
# Off by default (anomalyfactory.enabled); AF_OUTPUTS is empty, and the rules absent, where it is off.
# Each training stage resumes from its work folder (periodic checkpoints outside the outputs, named by
# the run's settings) like the train stage, and publishes a checkpoint in the project's format.

AF = config["anomalyfactory"]
AF_SEMANTIC = float(AF["flare"]["region_mix"]) > 0  # SAM regions needed
AF_OUTPUTS = (
    {
        "boot": "results/anomalyfactory/boot/checkpoint",
        "flare": "results/anomalyfactory/flare/checkpoint",
        "blaze": "results/anomalyfactory/blaze/checkpoint",
        "localize": "results/metrics/localize.json",
        "quality": "results/metrics/af_generation.json",
    }
    if AF["enabled"]
    else {}
)
AF_REGIONS = {"regions": "results/anomalyfactory/regions.h5"} if AF_SEMANTIC else {}
AF_SELECT = config["train"]["select"]
AF_PER_DATASET = dict(AF["per_dataset"])
AF_TRAIN = {k: v for k, v in config["train"].items() if k != "select"}


if AF_OUTPUTS:

    rule boot:
        input:
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
        output:
            checkpoint=directory(AF_OUTPUTS["boot"]),
            losses=report(
                "results/anomalyfactory/boot/losses.csv",
                caption="../workflow/report/af_losses.rst",
                category="AnomalyFactory",
                subcategory="Boot",
            ),
            samples=report(
                directory("results/anomalyfactory/boot/samples"),
                patterns=["step-{step}.png"],
                caption="../workflow/report/af_samples.rst",
                category="AnomalyFactory",
                subcategory="Boot",
            ),
        log:
            "results/logs/boot.log",
        benchmark:
            "results/benchmarks/boot.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=24 * 60,
        params:
            model=config["model"],  # sizes; decoders [AHE] and conditions [reference_image, target_edge] forced
            train=AF_TRAIN,
            boot=AF["boot"],
            select=AF_SELECT,
            per_dataset=AF_PER_DATASET,
            seed=AF["seed"],
            augment=config["augment"],
            paths=model_paths(),
            work_root="results/anomalyfactory/boot/work",
            code=code_hash("hybrid.stages.boot"),
        script:
            "../workflow/scripts/boot.py"

    rule flare:
        input:
            **AF_REGIONS,
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
            boot=AF_OUTPUTS["boot"],
        output:
            checkpoint=directory(AF_OUTPUTS["flare"]),
            losses=report(
                "results/anomalyfactory/flare/losses.csv",
                caption="../workflow/report/af_losses.rst",
                category="AnomalyFactory",
                subcategory="Flare",
            ),
            samples=report(
                directory("results/anomalyfactory/flare/samples"),
                patterns=["step-{step}.png"],
                caption="../workflow/report/af_samples.rst",
                category="AnomalyFactory",
                subcategory="Flare",
            ),
        log:
            "results/logs/flare.log",
        benchmark:
            "results/benchmarks/flare.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=12 * 60,
        params:
            train=AF_TRAIN,
            flare=AF["flare"],
            augment=config["augment"],
            manipulate=config["generate"]["manipulate"],  # region shapes and sizes of the stochastic regions
            sam=AF["sam"],
            select=AF_SELECT,
            per_dataset=AF_PER_DATASET,
            seed=AF["seed"],
            paths=model_paths(),
            work_root="results/anomalyfactory/flare/work",
            code=code_hash("hybrid.stages.flare"),
        script:
            "../workflow/scripts/flare.py"

    rule blaze:
        input:
            **AF_REGIONS,
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
            flare=AF_OUTPUTS["flare"],
        output:
            checkpoint=directory(AF_OUTPUTS["blaze"]),
            losses=report(
                "results/anomalyfactory/blaze/losses.csv",
                caption="../workflow/report/af_losses.rst",
                category="AnomalyFactory",
                subcategory="Blaze",
            ),
            samples=report(
                directory("results/anomalyfactory/blaze/samples"),
                patterns=["step-{step}.png"],
                caption="../workflow/report/af_samples.rst",
                category="AnomalyFactory",
                subcategory="Blaze",
            ),
        log:
            "results/logs/blaze.log",
        benchmark:
            "results/benchmarks/blaze.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=12 * 60,
        params:
            train=AF_TRAIN,
            blaze=AF["blaze"],
            flare=AF["flare"],
            augment=config["augment"],
            manipulate=config["generate"]["manipulate"],
            sam=AF["sam"],
            select=AF_SELECT,
            per_dataset=AF_PER_DATASET,
            seed=AF["seed"],
            paths=model_paths(),
            work_root="results/anomalyfactory/blaze/work",
            code=code_hash("hybrid.stages.blaze"),
        script:
            "../workflow/scripts/blaze.py"

    rule localize:
        input:
            **AF_REGIONS,
            index="results/shards/index.parquet",
            manifest="results/manifest.parquet",
            boot=AF_OUTPUTS["boot"],
            flare=AF_OUTPUTS["flare"],
            blaze=AF_OUTPUTS["blaze"],
        output:
            json=report(
                AF_OUTPUTS["localize"],
                caption="../workflow/report/localize.rst",
                category="AnomalyFactory",
                subcategory="Localisation",
            ),
            table="results/metrics/localize.parquet",
            strips=report(
                directory("results/anomalyfactory/strips"),
                patterns=["{name}.png"],
                caption="../workflow/report/localize_strips.rst",
                category="AnomalyFactory",
                subcategory="Localisation",
            ),
            quality_json=report(
                AF_OUTPUTS["quality"],
                caption="../workflow/report/af_generation.rst",
                category="AnomalyFactory",
                subcategory="Generation quality",
            ),
            quality_table="results/metrics/af_generation.parquet",
        log:
            "results/logs/localize.log",
        benchmark:
            "results/benchmarks/localize.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=2 * 60,
        params:
            localize=AF["localize"],
            quality=AF["quality"],
            flare=AF["flare"],
            manipulate=config["generate"]["manipulate"],
            sam=AF["sam"],
            evaluate=config["evaluate"],  # the IS / cluster LPIPS networks and settings of Tables 1-2
            code=code_hash("hybrid.stages.localize"),
        script:
            "../workflow/scripts/localize.py"


if AF_OUTPUTS and AF_REGIONS:

    rule sam_regions:
        input:
            index="results/shards/index.parquet",
        output:
            regions=AF_REGIONS["regions"],
        log:
            "results/logs/sam_regions.log",
        benchmark:
            "results/benchmarks/sam_regions.tsv"
        conda:
            "../envs/hybrid.yaml"
        threads: 2
        resources:
            mem_mb=16000,
            runtime=4 * 60,
        params:
            sam=AF["sam"],
            fallback=AF["flare"]["semantic_fallback"],
            paths=model_paths(),
            code=code_hash("hybrid.stages.sam_regions"),
        script:
            "../workflow/scripts/sam_regions.py"
