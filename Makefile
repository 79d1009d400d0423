# halo-mpi: `make demo` and `make test` each set up everything they need on a fresh machine
# (venv, packages, MPI from PyPI, the model's weights) and then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HALO := $(VENV)/bin/halo-mpi
MPIEXEC := $(VENV)/bin/mpiexec
GGUF := weights/SmolLM2-135M-Instruct.Q4_1.gguf
STORE := weights/smollm2-135m.h5
STORE_Q4 := weights/smollm2-135m-q4.h5
STORE_Q8 := weights/smollm2-135m-q8_0.h5
MLP_GROUPS ?= 24
# the CPU wheel of torch 2.13.0 lies in /opt/wheels on the dev machines
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
export HALO_REQUIRE_WEIGHTS := 1

.PHONY: demo test lint test-serial test-mpi install weights clean

demo: $(STORE)
	$(MPIEXEC) -n 1 $(HALO) generate --weights $(STORE) --prompt "The capital of France is" \
		--max-new-tokens 32 --temperature 0
	$(MPIEXEC) -n 4 $(HALO) generate --weights $(STORE) --prompt "The capital of France is" \
		--max-new-tokens 32 --temperature 0 --parallel tensor --sync halo --link-loss 2:0.05,3:0.05

test: lint test-serial test-mpi

# ruff (style and likely bugs) and the import-linter contracts in pyproject.toml (the layers)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check halo_mpi tests
	$(VENV)/bin/lint-imports

test-serial: $(STORE)
	$(PY) -m pytest -m "not mpi" tests

test-mpi: $(STORE)
	$(PY) tests/mpi_run.py 2 -q -m mpi tests
	$(PY) tests/mpi_run.py 4 -q -m mpi tests
	$(PY) tests/mpi_run.py 1 -q -m mpi tests/test_tensor_mpi.py -k any_size
	$(PY) tests/mpi_run.py 3 -q -m mpi tests/test_tensor_mpi.py -k any_size

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check $(PIP_FLAGS) -e '.[test,bench]'
	touch $@

weights: $(STORE) $(STORE_Q4) $(STORE_Q8)

$(GGUF): | $(VENV)/.installed
	$(HALO) fetch-weights --dir weights

# convert, regroup neurons by co-activation, measure importance and fit the predictors; the store
# appears only when all of it succeeded
$(STORE): $(GGUF)
	$(HALO) convert $(GGUF) -o $(STORE).tmp --mlp-groups $(MLP_GROUPS) --store-dtype float32
	$(HALO) calibrate --weights $(STORE).tmp --regroup
	mv $(STORE).tmp $(STORE)

# quantized stores straight from the GGUF (q4 keeps its Q4_1 codes; regrouping would move neurons
# across blocks and round them again), calibrated without regrouping
weights/smollm2-135m-%.h5: $(GGUF)
	$(HALO) convert $(GGUF) -o $@.tmp --mlp-groups $(MLP_GROUPS) --store-dtype $*
	$(HALO) calibrate --weights $@.tmp
	mv $@.tmp $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
