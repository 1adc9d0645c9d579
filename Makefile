# Two commands do all set-up: `make demo` and `make test` create .venv when missing and install the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# -c, not PIP_CONSTRAINT: the variable would replace the machine's own constraint file
PIP_INSTALL = pip install --quiet -c constraints.txt
EXTRAS := .[demo,dev,weights]
# The lock's torch is the CPU build, which PyPI does not host: where pip's configuration names no place holding it
# (this project's machines have a folder of wheels), the install is tried again with PyTorch's CPU index
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
DRIFT := .venv-drift
DRIFT_RUN := runs/drift

.PHONY: demo test test-fast bench quality lock drift tools clean

# The demo's speech is synthesised by Debian's espeak-ng and resampled by sox (the demo, the benchmarks and drift
# build it; the tests need neither). Installed by apt-get as root; anyone else is told the command, as apt-get would
# only fail for want of root.
tools:
	@if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null; \
		else \
			echo "the demo's speech needs espeak-ng and sox (Debian: sudo apt-get install espeak-ng sox)" >&2; exit 1; \
		fi; \
	fi

# Installs exactly the lock: a new venv each time (so nothing dropped from the lock lingers), --no-deps (so
# nothing unlocked comes in), then `pip check` fails if the lock misses something pyproject.toml asks for.
$(STAMP): $(LOCK) pyproject.toml constraints.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/$(PIP_INSTALL) --no-deps -r $(LOCK) || { echo "retrying with $(TORCH_CPU_INDEX) for torch's CPU build" >&2; \
		$(BIN)/$(PIP_INSTALL) --no-deps -r $(LOCK) --extra-index-url $(TORCH_CPU_INDEX); }
	$(BIN)/$(PIP_INSTALL) --no-deps -e .
	$(BIN)/pip check || { echo "$(LOCK) does not satisfy pyproject.toml: run make lock" >&2; exit 1; }
	touch $@

demo: tools $(STAMP)
	$(BIN)/modrwkv demo

# the 15 slowest tests listed at the end: the suite's 20-minute budget is spent where they are
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# every module, without the multi-minute runs (Ray Train + DeepSpeed, learning checks): about 4 minutes on 2 cores
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Re-resolves the lock on purpose: the newest versions pyproject.toml's ranges allow, in a throwaway venv,
# frozen with every transitive package (setuptools too: torch requires it at run time; pip itself is not locked).
# Then `make test` installs it; commit it if that passes.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/"$(PIP_INSTALL) -e '$(EXTRAS)'; \
	{ echo "# make lock: every package that make test and make demo install (Linux x86-64, CPython 3.11)"; \
	  "$$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -v '^pip=='; } > "$$tmp/lock"; \
	mv "$$tmp/lock" $(LOCK)
	@echo "wrote $(LOCK); now run make test, and commit the lock if it passes"

# Finds drift before users do: the newest versions the ranges allow (no lock) in their own venv, the fast tests,
# then a tiny real encode (the demo's digits config, real DINOv2-S) and both training phases (a few steps each;
# the MLflow database's path is absolute, since Ray Train's workers run in a directory of their own).
DRIFT_TRAIN = $(DRIFT)/bin/modrwkv train --config configs/demo/train.yaml \
	--set "caches=[$$(ls -d $(DRIFT_RUN)/cache/image-dinov2-*)]" --set phase1.mix=null --set phase2.mix=null \
	--set phase1.steps=3 --set phase2.steps=3 --set phase1.checkpoint_every=0 --set phase2.checkpoint_every=0 \
	--set phase1.warmup_steps=0 --set phase2.warmup_steps=0 \
	--set 'model.projectors={image: {kernel: 5, stride: 4, adapter_scale: 2}}' \
	--set model.backbone.path=$(DRIFT_RUN)/backbone --set output_dir=$(DRIFT_RUN)/train \
	--set tracking.tracking_uri=sqlite:///$(abspath $(DRIFT_RUN))/mlflow.db
drift: tools
	$(PYTHON) -m venv --clear $(DRIFT)
	$(DRIFT)/bin/$(PIP_INSTALL) -e '$(EXTRAS)'
	$(DRIFT)/bin/pip check
	@echo "drift: resolved (differences from $(LOCK): < locked, > resolved now)"
	@$(DRIFT)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|kernels|ray|deepspeed|mlflow)=='
	@$(DRIFT)/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | diff $(LOCK) - | grep '^[<>] [^#]' || true
	$(DRIFT)/bin/python -m pytest -q -m "not slow"
	rm -rf $(DRIFT_RUN)
	$(DRIFT)/bin/modrwkv data demo --out $(DRIFT_RUN)/data
	$(DRIFT)/bin/modrwkv encoder export dinov2-small $(DRIFT_RUN)/encoders/dinov2-small
	$(DRIFT)/bin/python -m pipelines.encode --config configs/demo/encode_digits_train.yaml \
		--set dataset.path=$(DRIFT_RUN)/data/digits/train.json \
		--set encoder.model_dir=$(DRIFT_RUN)/encoders/dinov2-small --set cache.root=$(DRIFT_RUN)/cache
	$(DRIFT)/bin/python -c "from pathlib import Path; from pipelines.demo_backbone import pretrained_backbone; \
		pretrained_backbone(Path('$(DRIFT_RUN)/backbone'), steps=20)"
	$(DRIFT_TRAIN) --phase 1
	$(DRIFT_TRAIN) --phase 2
	@echo "drift: passed with"
	@$(DRIFT)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|kernels|ray|deepspeed|mlflow)=='

bench: tools $(STAMP)
	$(BIN)/python benchmarks/backbone_cpu.py
	$(BIN)/python benchmarks/wkv7_kernels.py
	$(BIN)/python benchmarks/phase2_throughput.py
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/quality.py

# learning quality against probe/ridge ceilings and trivial baselines, 3 seeds (about 70 minutes on 2 cores)
quality: tools $(STAMP)
	$(BIN)/python benchmarks/quality.py

# the services first: their record, database and token are under runs/, and `down` finds them by it
clean:
	if [ -x $(BIN)/modrwkv ]; then $(BIN)/modrwkv services down; fi
	rm -rf $(VENV) $(DRIFT) runs benchmarks/out
