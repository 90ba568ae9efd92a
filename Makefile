# The whole set-up on a fresh machine (Python 3.11, CPU only, package registries only):
#   make demo   installs relaydiff and runs the main job (relaydiff demo: bundle, host and device on loopback)
#   make test   installs relaydiff with its test tools, lints and type-checks the library (ruff, mypy) and runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.relaydiff-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0 (an unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[export,test]'
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/relaydiff demo --out-dir out/demo

test: $(STAMP)
	$(BIN)/python -m ruff check relaydiff export quantize runtime host
	# mypy cannot follow the package-dir mapping (relaydiff.export is export/, ...): check a tree of links in the installed layout
	rm -rf build/typecheck && mkdir -p build/typecheck/relaydiff
	ln -s $(CURDIR)/relaydiff/* build/typecheck/relaydiff/
	for d in export quantize runtime host; do ln -s $(CURDIR)/$$d build/typecheck/relaydiff/$$d; done
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out build/typecheck .mypy_cache
