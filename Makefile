# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the workflow on the embedded demo data
#   (make demo-industrial: the same on the procedural MVTec-AD-like industrial demo)
#   make test   installs into .venv and runs the tests
#   make lint   snakemake --lint, snakefmt --check and ruff check (the lint extra)
#   make report Snakemake's report of the last run (results/report.zip)
# TORCH selects the torch build: the default is the CPU wheel these machines carry; on a GPU
# workstation use e.g. `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.

VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CORES ?= all

.PHONY: install demo demo-industrial test lint report clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[workflow,test,lint]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/config.yaml

demo-industrial: install
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/config.yaml config/industrial.yaml

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check .
	$(VENV)/bin/ruff check .

# After `make demo` (or any run): its outputs, captions and provenance as one zip (open report.html inside);
# after `make demo-industrial`: make report REPORT_ARGS="--configfile config/config.yaml config/industrial.yaml"
report: install
	$(VENV)/bin/snakemake --report results/report.zip $(REPORT_ARGS)

clean:
	rm -rf results .snakemake
