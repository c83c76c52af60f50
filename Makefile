# Set-up and main jobs. `make demo` and `make test` create the environment when it is missing.
VENV ?= .venv
BIN := $(VENV)/bin
# Data: found by layer_probe.data.resolve_data (README, "Data"). A $LAYER_PROBE_DATA given here is made
# absolute, because notebook kernels run in notebooks/.
ifdef LAYER_PROBE_DATA
override LAYER_PROBE_DATA := $(abspath $(LAYER_PROBE_DATA))
export LAYER_PROBE_DATA
endif
ARCHS ?= resnet20 plain20 resnet56 plain56 resnet110

.PHONY: env demo test check-shipped lab checkpoints card ablations faithful replicates notebooks
env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

# With no CIFAR-10 found, --download fetches it (about 170 MB) into ~/.cache/layer-probe/cifar10 first.
demo: env
	$(BIN)/layer-probe responses checkpoints/resnet56.pt --download --limit 2000 --plot out/fig7.png --out out

test: env
	$(BIN)/pytest

# Integrity of checkpoints/ (card, logs, histories, the degradation problem in the logs): not a test of the code
check-shipped: env
	$(BIN)/pytest tests/check_shipped.py

# The five networks of Fig. 7, one after another; rerunning continues where a run stopped.
checkpoints: env
	for arch in $(ARCHS); do $(BIN)/layer-probe train --arch $$arch --recipe fast --resume || exit 1; done
	$(MAKE) card

# checkpoints/README.md and training_curves.png for every finished run in checkpoints/
card: env
	$(BIN)/layer-probe checkpoints --write checkpoints \
		$(wildcard checkpoints/*.pt checkpoints/ablations/*.pt checkpoints/faithful/*.pt)

# Which training choices make Fig. 7: resnet20 ablations paired with the shipped (fast) resnet20, the five networks
# under the faithful recipe, and seed replicates. Each run continues where it stopped; one at a time.
TRAIN := $(BIN)/layer-probe train --resume
ablations: env
	$(TRAIN) --arch resnet20 --recipe fast --label-smoothing 0 --out checkpoints/ablations/resnet20-no-smoothing.pt
	$(TRAIN) --arch resnet20 --recipe fast --head normalized --out checkpoints/ablations/resnet20-normalized-head.pt
	$(TRAIN) --arch resnet20 --recipe fast --freeze-last-bn --out checkpoints/ablations/resnet20-frozen-last-bn.pt

faithful: env
	for arch in $(ARCHS); do $(TRAIN) --arch $$arch --recipe faithful --out checkpoints/faithful/$$arch.pt || exit 1; done

replicates: env
	for seed in 1 2; do for arch in resnet20 plain20; do \
		$(TRAIN) --arch $$arch --recipe faithful --seed $$seed --out checkpoints/faithful/$$arch-seed$$seed.pt || exit 1; \
	done; done

# JupyterLab on the notebooks; they find the data themselves (README, "Data").
lab: env
	$(BIN)/jupyter lab notebooks/

# Execute every notebook in place (all 10,000 test images unless LAYER_PROBE_IMAGES says fewer) and save each
# answer's values in notebooks/answers/ for `layer-probe report --lang`.
notebooks: env
	cd notebooks && LAYER_PROBE_SAVE_ANSWERS=1 ../$(BIN)/jupyter nbconvert --to notebook --execute \
		--inplace --ExecutePreprocessor.timeout=7200 *.ipynb
