# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
# The CPU build; on a GPU machine use e.g. `make demo TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install clean demo-model demo-model-base

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

# Retrains the committed demo model (README, "The demo model"): its base (models/synthactions/base, 8 px patches at
# 64 px) resized to 12 px patches at 96 px, stage 2 from there on varied, plain, tiny and empty clips (8 x 8 tokens),
# the result put on a 12 x 12 grid at 144 px (no training), then its tiled head. Scratch goes to runs/ (a rerun after
# changing the data: delete runs/synthactions first).
demo-model: $(VENV)/.installed
	$(BIN)/reeltag synth runs/synthactions/varied --clips 15000 --seed 6 --split varied
	$(BIN)/reeltag synth runs/synthactions/plain --clips 4000 --seed 4
	$(BIN)/reeltag synth runs/synthactions/tiny --clips 2000 --seed 3 --split tiny
	$(BIN)/reeltag synth runs/synthactions/empty --clips 1500 --seed 7 --split empty
	cat runs/synthactions/varied/labels.jsonl runs/synthactions/plain/labels.jsonl runs/synthactions/tiny/labels.jsonl runs/synthactions/empty/labels.jsonl > runs/synthactions/train_all.jsonl
	$(BIN)/reeltag synth runs/synthactions/val --clips 600 --seed 2
	rm -rf runs/synthactions/base96
	$(BIN)/python -m encoders.patches models/synthactions/base runs/synthactions/base96 --patch-size 12
	$(BIN)/reeltag train configs/train_synthactions.yaml
	rm -rf runs/synthactions/model144
	$(BIN)/python -m encoders.patches runs/synthactions/out/model runs/synthactions/model144 --grid 12
	cp runs/synthactions/model144/* models/synthactions/
	$(BIN)/reeltag synth runs/synthactions/small --clips 1500 --seed 5 --split small
	head -1800 runs/synthactions/varied/labels.jsonl > runs/synthactions/tiles_all.jsonl
	head -450 runs/synthactions/plain/labels.jsonl >> runs/synthactions/tiles_all.jsonl
	head -250 runs/synthactions/tiny/labels.jsonl >> runs/synthactions/tiles_all.jsonl
	cat runs/synthactions/small/labels.jsonl >> runs/synthactions/tiles_all.jsonl
	$(BIN)/reeltag train configs/train_synthactions_tiles.yaml
	mkdir -p models/synthactions/tiles && cp runs/synthactions/tiles/head/* models/synthactions/tiles/

# Stage 1, the base the demo model goes on from (~35 min): from scratch on plain clips.
demo-model-base: $(VENV)/.installed
	$(BIN)/reeltag synth runs/synthactions-base/train --clips 26000 --seed 1
	$(BIN)/reeltag synth runs/synthactions-base/tiny --clips 4000 --seed 3 --split tiny
	cat runs/synthactions-base/train/labels.jsonl runs/synthactions-base/tiny/labels.jsonl > runs/synthactions-base/train_all.jsonl
	$(BIN)/reeltag synth runs/synthactions-base/val --clips 600 --seed 2
	$(BIN)/reeltag train configs/train_synthactions_base.yaml
	mkdir -p models/synthactions/base && cp runs/synthactions-base/out/model/* models/synthactions/base/

clean:
	rm -rf $(VENV) reeltag-demo
