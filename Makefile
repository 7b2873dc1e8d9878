# The two set-up commands of the README: `make experiment` (the main job) and `make test`.
# Each creates .venv from requirements.lock when it is missing or out of date.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

.PHONY: install experiment test bench
install: $(STAMP)

experiment: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/orthomerge experiment --out runs/default

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/run_all.py
