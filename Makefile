# One command sets up and runs the main job; one sets up and runs the tests.
#   make demo   venv + install, then the main job at the smoke preset: Tables 1-3, 1 seed (choices on it too)
#   make test   venv + install, then ruff and the whole pytest suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cmkg reproduce --config smoke --seeds 1 --choice-seeds 0 --phi-seeds 0   # report: runs/reports/smoke

test: setup
	$(BIN)/ruff check cmkg tests bench
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing" >&2; exit 1; fi; \
	exit $$rc

bench: setup
	$(BIN)/python bench/bench_render.py
	$(BIN)/python bench/bench_fit.py
	$(BIN)/python bench/bench_step.py
	$(BIN)/python bench/bench_meta.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_ray.py
	$(BIN)/python bench/bench_tune.py
	$(BIN)/python bench/bench_ablate.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
