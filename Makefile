# Set-up and main jobs. `make demo` and `make test` create the environment when it is missing.
VENV ?= .venv
BIN := $(VENV)/bin
SHARED := ../shared
# Data: $LAYER_PROBE_DATA if set, else the JPEG CIFAR-10 archive beside the project when present.
# Absolute, because notebook kernels run in notebooks/.
LAYER_PROBE_DATA ?= $(wildcard $(SHARED)/datasets/cifar10-jpeg.tar.gz)
override LAYER_PROBE_DATA := $(abspath $(LAYER_PROBE_DATA))
export LAYER_PROBE_DATA
DEMO_CKPT ?= $(firstword $(wildcard checkpoints/resnet56.pt) $(SHARED)/checkpoints/akamaster/resnet20-12fca82f.th)
DEMO_ARCH := $(if $(findstring akamaster,$(DEMO_CKPT)),--arch resnet20,)
ARCHS ?= resnet20 plain20 resnet56 plain56 resnet110

.PHONY: env demo test checkpoints notebooks
env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

demo: env
	$(BIN)/layer-probe responses $(DEMO_CKPT) $(DEMO_ARCH) --limit 2000 --plot out/fig7.png --out out

test: env
	$(BIN)/pytest

# The five networks of Fig. 7, one after another; rerunning continues where a run stopped.
checkpoints: env
	for arch in $(ARCHS); do $(BIN)/layer-probe train --arch $$arch --recipe fast --resume || exit 1; done
	$(BIN)/layer-probe checkpoints --write checkpoints

# Execute every notebook in place on all 10,000 test images (the committed outputs come from this).
notebooks: env
	cd notebooks && ../$(BIN)/jupyter nbconvert --to notebook --execute \
		--inplace --ExecutePreprocessor.timeout=7200 *.ipynb
