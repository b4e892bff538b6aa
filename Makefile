# The two set-up commands of the README: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(PY) -m galaxy_tune search lora
	$(PY) -m galaxy_tune retrain

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) results/demo-data results/prepared results/bench results/search-* results/retrain-*
