# `make demo` and `make test` each create .venv when needed, install into it, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# `make demo ARGS=steps=300,num_eval=500`: arguments of configs/demo.py.
ARGS ?=
EXPERIMENT_DIR ?= workdir/experiment
# Three times the demo's training (steps, questions) and twice its held-out questions: about half an
# hour per seed on 2 cores.
EXPERIMENT_ARGS ?= steps=450,num_train=1800,num_eval=420
SEEDS ?= 0 1 2

.PHONY: install browser demo experiment test test-fast bench clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/vpd-jax demo --config=configs/demo.py:$(ARGS) --workdir=$(WORKDIR)

# Not in CI: the demo at a larger size for several seeds, then the vpd - direct margins.
experiment: install
	for seed in $(SEEDS); do \
		$(VENV)/bin/vpd-jax demo --config=configs/demo.py:seed=$$seed,$(EXPERIMENT_ARGS) \
			--workdir=$(EXPERIMENT_DIR)/seed_$$seed || exit 1; \
	done
	$(VENV)/bin/vpd-jax summarize --workdir=$(EXPERIMENT_DIR)

# The report test loads report.html in headless Chromium (Debian's package).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 tests $(PYTEST_ARGS)

test-fast: install browser
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 -m "not slow" tests $(PYTEST_ARGS)

bench: install
	mkdir -p $(WORKDIR)/bench
	$(VENV)/bin/vpd-jax bench executor --json $(WORKDIR)/bench/executor.json
	$(VENV)/bin/vpd-jax bench tools --json $(WORKDIR)/bench/tools.json
	$(VENV)/bin/vpd-jax bench input --json $(WORKDIR)/bench/input.json
	$(VENV)/bin/vpd-jax bench decode --json $(WORKDIR)/bench/decode.json
	$(VENV)/bin/vpd-jax bench train --json $(WORKDIR)/bench/train.json
	$(VENV)/bin/vpd-jax bench attention --json $(WORKDIR)/bench/attention.json
	$(VENV)/bin/vpd-jax bench rollout --json $(WORKDIR)/bench/rollout.json

clean:
	rm -rf $(VENV) workdir
