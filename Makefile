# Two entry points for a newcomer on a fresh machine (Python 3.11 and make):
#   make sim    set up .venv and run a what-if simulation on built-in defaults
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sim test clean protos

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

sim: $(STAMP)
	$(VENV)/bin/emoe sim --plots out/plots

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# Regenerate the gRPC stubs in emoe/rpc/v1 from protos/ (commit them; a test checks they are fresh).
protos: $(STAMP)
	$(PY) -m emoe.rpc.protogen

clean:
	rm -rf $(VENV) out
