# make demo: install into .venv, build the tiny checkpoint, run flux-sharded on it on the CPU.
# make test: install into .venv, run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN ?= $(VENV)/bin
STAMP ?= $(VENV)/.installed
# The CPU build of torch that CI uses; users with GPUs: make install TORCH_SPEC='torch==2.13.0' from their CUDA index,
# or simply `pip install -e .` into an environment that already has torch.
TORCH_SPEC ?= torch==2.13.0
TINY ?= .cache/tiny-flux
DEMO_OUT ?= demo-out

.PHONY: install tiny demo test bench-quick bench-charts clean

install: $(STAMP)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "== 1/2: $(TORCH_SPEC) into $(VENV): the CPU build is a download of about 200 MB; a CUDA build, with its NVIDIA libraries, several GB"
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	@echo "== 2/2: flux-sharded with diffusers, transformers, accelerate and the test tools (torchao, bitsandbytes): about 400 MB installed"
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	touch $@

tiny: $(TINY)/model_index.json

$(TINY)/model_index.json: $(STAMP)
	@echo "== building the tiny random checkpoint (under 1 MB, a few seconds)"
	$(BIN)/python -m flux_sharded.tiny $(TINY)

demo: $(STAMP) $(TINY)/model_index.json
	rm -rf $(DEMO_OUT)
	$(BIN)/flux-sharded --model $(TINY) --prompt "a photo of a dog" --max-memory cpu=4GB \
		--steps 4 --height 256 --width 256 --out $(DEMO_OUT) --report $(DEMO_OUT)/report.json

test: $(STAMP)
	$(BIN)/python -m pytest

# CPU benchmark, staged vs one-piece, on the tiny and mini checkpoints (under 3 minutes here);
# its last line is one JSON object.
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench.py --scenarios tiny mini --work .cache/bench

# The same, drawing benchmarks/charts/*.png (installs matplotlib, the optional bench extra).
bench-charts: $(STAMP)
	@echo "== installing matplotlib (the bench extra, about 30 MB)"
	$(BIN)/python -m pip install -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/bench.py --scenarios tiny mini --work .cache/bench --charts benchmarks/charts

clean:
	rm -rf $(VENV) .cache $(DEMO_OUT)
