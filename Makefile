# Two commands do all set-up on a fresh machine:
#   make demo   export the built-in demo Molmo and answer a prompt about a bundled photo
#   make test   run the whole test suite (what CI runs)
PY ?= python3
VENV := .venv
RT_VENV := .venv-runtime
TRITON_VENV := .venv-triton
OUT ?= out/demo

.PHONY: demo test test-main test-runtime test-triton typecheck clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[export,ort,quant,bench,dev]'
	# type stubs only: the tensorrt-stubs wheel declares a dependency on tensorrt itself
	$(VENV)/bin/pip install -q --no-deps 'tensorrt-stubs==10.13.0.35.1'
	touch $@

# The runtime's own environment: no torch installed at all.
$(RT_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(RT_VENV)
	$(RT_VENV)/bin/pip install -q --upgrade pip
	$(RT_VENV)/bin/pip install -q -e '.[ort,quant,dev]'
	touch $@

# Triton Inference Server's environment: nvidia-pytriton bundles tritonserver and pins numpy<2,
# so the server (and the Python-backend model, via EXECUTION_ENV_PATH) gets its own venv.
$(TRITON_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q 'nvidia-pytriton==0.7.0' -e '.[ort]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/molmo-export --model demo --target ort-fp32 --out $(OUT) --force
	$(VENV)/bin/molmo-run $(OUT) --image runtime/molmo_runtime/assets/demo.jpg \
		--prompt "Point to the cat." --max-new-tokens 24

test: test-main test-runtime test-triton typecheck

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests --ignore=tests/serving

test-runtime: $(RT_VENV)/.installed
	$(RT_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
	$(RT_VENV)/bin/python -m pytest -q tests/runtime tests/calibration tests/test_torch_free.py

# A real tritonserver on 127.0.0.1 serving the demo artifact (tests/serving/test_triton.py).
test-triton: $(VENV)/.installed $(TRITON_VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests/serving

# tensorrt-stubs 10.13 ships .pyi files without py.typed and with a few lines mypy cannot read:
# check against a fixed copy (tests/gpu/trt_stubs.py says what it fixes).
TRT_STUBS := build/trt-stubs
typecheck: $(VENV)/.installed
	$(VENV)/bin/python tests/gpu/trt_stubs.py $(TRT_STUBS)
	MYPYPATH=$(TRT_STUBS) $(VENV)/bin/python -m mypy --strict molmo_export/trt runtime/molmo_runtime/backends/trt.py runtime/molmo_runtime/cuda_api.py runtime/molmo_runtime/trt_buffers.py runtime/molmo_runtime/trt_env.py

clean:
	rm -rf $(VENV) $(RT_VENV) $(TRITON_VENV) out
