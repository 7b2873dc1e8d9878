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

# `make bench`: the three benchmark scripts at their quick settings; results are printed as Markdown tables.
# Roughly 10 minutes on 2 cores, most of it bench_learned.py's data-driven merges (longer when it first has
# to train adapters because runs/default/adapters/seed0/lora is missing). The numbers in BENCHMARKS.md come
# from each script's full plan (see its --help); bench_merge.py and bench_learned.py rewrite their own
# BENCHMARKS.md sections with --write.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/bench_osrm.py --samples 64 --repeats 1
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/bench_merge.py --quick
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/bench_learned.py --repeat 1 --no-quality
	@echo "Results: the tables above (stdout only; BENCHMARKS.md is unchanged without --write)."
