# Quick start: `make demo` (prune the bundled default model) and `make test`.
# Both build their own virtual environment from pinned versions (constraints.txt).
PY ?= python3
DEMO_VENV := .venv
TEST_VENV := .venv-test
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test dataset clean docs bench

$(DEMO_VENV)/.done: pyproject.toml constraints.txt
	$(PY) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q -c constraints.txt -e '.[cpu]'
	touch $@

$(TEST_VENV)/.done: pyproject.toml constraints.txt
	$(PY) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $@

dataset:
	@[ -d $(FMNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } || echo "warning: could not install dataset-fashion-mnist (accuracy columns will be skipped)"

demo: $(DEMO_VENV)/.done dataset
	$(DEMO_VENV)/bin/python -m models.demo

test: $(TEST_VENV)/.done dataset
	$(TEST_VENV)/bin/python -m pytest

docs: $(TEST_VENV)/.done
	$(TEST_VENV)/bin/python -m spa.docgen

bench: $(TEST_VENV)/.done
	$(TEST_VENV)/bin/python benchmarks/engine.py

clean:
	rm -rf $(DEMO_VENV) $(TEST_VENV)
