# The two set-up commands: `make run` and `make test`. Both need only Python 3.10+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PNEUMOSCAN_DATA ?= ./data/chest_xray
export PNEUMOSCAN_DATA

.PHONY: run test test-fast lint format clean system-tools browser dicom-tools stress

$(BIN)/pneumoscan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	@touch $@

## Evaluate the study's bundled models (dense, cnn, transfer, ensemble) on the test split of
## $PNEUMOSCAN_DATA, and children-adults on it and on the NIH adults' test part where those films
## lie beside it; without the data set, screen the example X-rays that ship in the package.
NIH_TEST := experiments/nih_adult/test.csv
run: $(BIN)/pneumoscan
	@if [ -d "$(PNEUMOSCAN_DATA)/test" ]; then \
	  $(BIN)/pneumoscan evaluate --model dense --model cnn --model transfer --model ensemble --data "$(PNEUMOSCAN_DATA)" --split test; \
	  if [ -f "$$(dirname $(NIH_TEST))/$$(sed -n 2p $(NIH_TEST) | cut -d, -f1)" ]; then \
	    $(BIN)/pneumoscan evaluate --model children-adults --model ensemble --data "$(PNEUMOSCAN_DATA)" --data $(NIH_TEST); \
	  fi; \
	else \
	  echo "no data set at $(PNEUMOSCAN_DATA) (set PNEUMOSCAN_DATA=DIR): screening the example X-rays instead" >&2; \
	  $(BIN)/pneumoscan predict --example --sort; \
	fi

## Load test of `pneumoscan serve`: 2,000 test images of $PNEUMOSCAN_DATA from 32 clients;
## fails on any error or on memory growth (bench/stress.py; figures in bench/results/stress.jsonl).
stress: $(BIN)/pneumoscan
	$(BIN)/python bench/stress.py --data "$(PNEUMOSCAN_DATA)"

## Lint, then the whole test suite (pytest's "no tests collected" counts as a failure).
test: $(BIN)/pneumoscan lint system-tools
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

## The development loop: every test not marked slow (no lint, no browser install).
test-fast: $(BIN)/pneumoscan
	$(BIN)/python -m pytest -q -m "not slow"

## The system's parts the tests drive, installed by apt in one go as root: Debian's Chromium for
## tests/test_browser.py (Playwright drives it; no browser is downloaded), and the DICOM
## network's real parts for tests/test_dicom_node.py: dcmtk (storescu, echoscu, storescp,
## dsrdump, dcmcjpeg) as modality and PACS, Orthanc with its DICOMweb plugin as a routing PACS,
## dicom3tools' dciodvfy to validate every SR and SC. Without root or apt the tests needing a
## missing part are skipped (CI runs as root and fails instead), and the build goes on.
SYSTEM_TOOLS := chromium:chromium /usr/share/fonts/truetype/liberation:fonts-liberation storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc \
  /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do cmd=$${t%%:*}; pkg=$${t#*:}; \
	  command -v $$cmd >/dev/null || [ -e $$cmd ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) || true; \
	  systemctl disable --now orthanc >/dev/null 2>&1 || service orthanc stop >/dev/null 2>&1 || true; \
	elif [ -n "$$missing" ]; then echo "missing:$$missing; the tests that need them will be skipped"; fi
browser dicom-tools: system-tools

lint: $(BIN)/pneumoscan
	$(BIN)/ruff check src tests bench experiments tools
	$(BIN)/ruff format --check src tests bench experiments tools

format: $(BIN)/pneumoscan
	$(BIN)/ruff format src tests bench experiments tools
	$(BIN)/ruff check --fix src tests bench experiments tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
