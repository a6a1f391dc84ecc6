# `make run` and `make test` create .venv when missing, install the pinned stack, and run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow docs install clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[harness,report,plots,dev]'
	# bytecode once at install, so that a cold command does not recompile the package (this
	# machine sets PYTHONDONTWRITEBYTECODE, which stops Python writing it on first import)
	$(BIN)/python -m compileall -q vramplan
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/vramplan fit llama-2-70b --method qlora

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the tests marked slow (every live CPU family, the wheel install, runner timeouts); CI runs them
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

docs: $(STAMP)
	$(BIN)/vramplan docs --out docs --readme README.md

clean:
	rm -rf $(VENV) build *.egg-info
