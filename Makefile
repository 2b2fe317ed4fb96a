# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
# The CPU build; on a GPU machine use e.g. `make demo TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install clean demo-model

demo: $(VENV)/.installed
	$(BIN)/reeltag demo

test: $(VENV)/.installed
	@command -v ffmpeg >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null; } || echo "ffmpeg CLI missing: its tests will be skipped"
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || echo "headless Chromium missing: the report rendering test will be skipped"
	$(BIN)/python -m pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Retrains the committed demo model from scratch (about 30 min on 2 cores), then its tiled head (a few minutes);
# see README "The demo model".
demo-model: $(VENV)/.installed
	$(BIN)/reeltag synth runs/synthactions/train --clips 26000 --seed 1
	$(BIN)/reeltag synth runs/synthactions/tiny --clips 4000 --seed 3 --split tiny
	cat runs/synthactions/train/labels.jsonl runs/synthactions/tiny/labels.jsonl > runs/synthactions/train_all.jsonl
	$(BIN)/reeltag synth runs/synthactions/val --clips 600 --seed 2
	$(BIN)/reeltag train configs/train_synthactions.yaml
	mkdir -p models/synthactions && cp runs/synthactions/out/model/* models/synthactions/
	$(BIN)/reeltag synth runs/synthactions/small --clips 3000 --seed 5 --split small
	head -6000 runs/synthactions/train/labels.jsonl > runs/synthactions/tiles_all.jsonl
	head -2000 runs/synthactions/tiny/labels.jsonl >> runs/synthactions/tiles_all.jsonl
	cat runs/synthactions/small/labels.jsonl >> runs/synthactions/tiles_all.jsonl
	$(BIN)/reeltag train configs/train_synthactions_tiles.yaml
	mkdir -p models/synthactions/tiles && cp runs/synthactions/tiles/head/* models/synthactions/tiles/

clean:
	rm -rf $(VENV) reeltag-demo
