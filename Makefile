# Two commands do all set-up on a fresh machine:
#   make demo   export the trained demo Molmo and point at a shape in a bundled image
#   make test   run the whole test suite (what CI runs): every part runs, failures are listed
#   make wheel  build dist/molmo_export-*.whl (install it anywhere: pip install 'WHEEL[ort]')
PY ?= python3
VENV := .venv
RT_VENV := .venv-runtime
TRITON_VENV := .venv-triton
OUT ?= out/demo

.PHONY: demo test test-main test-runtime test-triton typecheck wheel clean

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

# The trained demo (docs/demo_model.md) points at a shape in the bundled shapes image; the
# points are printed in pixels and drawn into $(OUT)-points.png.
demo: $(VENV)/.installed
	$(VENV)/bin/molmo-export --model demo --target ort-fp32 --out $(OUT) --force
	rm -f $(OUT)-points.png
	$(VENV)/bin/molmo-run $(OUT) --image runtime/molmo_runtime/assets/shapes.png \
		--prompt "Point to the red circle." --max-new-tokens 64 --draw $(OUT)-points.png

# Every part runs even when an earlier one fails; the summary names the failed parts and the
# exit status is non-zero if any failed. test-main runs first: it exports the test artifacts
# (build/test-artifacts) that test-runtime reuses without torch.
# The three environments are installed side by side (pip spends much of its time waiting on
# downloads and files; installed one after another they took 5 min 15 s on a 2-core machine).
# typecheck (mypy, one thread, needs no artifact) runs beside the test parts, most of which
# leave the second core idle; its output is held in build/typecheck.log and shown at the end.
PARTS := test-main test-runtime test-triton
ENVS := $(VENV)/.installed $(RT_VENV)/.installed $(TRITON_VENV)/.installed
test:
	@$(MAKE) --no-print-directory -j3 --output-sync=target $(ENVS)
	@mkdir -p build; failed=""; \
	$(MAKE) --no-print-directory typecheck > build/typecheck.log 2>&1 & typecheck=$$!; \
	for part in $(PARTS); do \
		echo "=== make $$part"; \
		$(MAKE) --no-print-directory $$part || failed="$$failed $$part"; \
	done; \
	wait $$typecheck || failed="$$failed typecheck"; \
	echo "=== make typecheck (ran beside the others)"; cat build/typecheck.log; \
	if [ -n "$$failed" ]; then echo "=== make test: FAILED:$$failed"; exit 1; fi; \
	echo "=== make test: all parts passed ($(PARTS) typecheck)"

# "heavy" tests (tens of minutes, several GB) run by hand: pytest -m heavy
PYTEST_ARGS ?= --durations=30 -m "not heavy"
# The torch-free tests run once, in test-runtime (tests/skipped_elsewhere.py): without torch, then
# those that skipped there (they need torch) in .venv.
TORCH_FREE_TESTS := tests/runtime tests/calibration tests/test_torch_free.py
SKIPPED_WITHOUT_TORCH := build/skipped-without-torch.txt
test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests --ignore=tests/serving \
		$(TORCH_FREE_TESTS:%=--ignore=%) $(PYTEST_ARGS)

test-runtime: $(RT_VENV)/.installed $(VENV)/.installed
	$(RT_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
	rm -f $(SKIPPED_WITHOUT_TORCH); status=0; \
	$(RT_VENV)/bin/python -m pytest -q $(TORCH_FREE_TESTS) $(PYTEST_ARGS) \
		--write-skipped $(SKIPPED_WITHOUT_TORCH) || status=1; \
	$(VENV)/bin/python -m pytest -q $(TORCH_FREE_TESTS) $(PYTEST_ARGS) \
		--only-listed $(SKIPPED_WITHOUT_TORCH) || status=1; \
	exit $$status

# A real tritonserver on 127.0.0.1 serving the demo artifact (tests/serving/test_triton.py).
test-triton: $(VENV)/.installed $(TRITON_VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests/serving $(PYTEST_ARGS)

# tensorrt-stubs 10.13 ships .pyi files without py.typed and with a few lines mypy cannot read:
# check against a fixed copy (tests/gpu/trt_stubs.py says what it fixes).
TRT_STUBS := build/trt-stubs
typecheck: $(VENV)/.installed
	$(VENV)/bin/python tests/gpu/trt_stubs.py $(TRT_STUBS)
	# --follow-imports=silent: modules these import (the torch exporter behind the builder's
	# output lock, ORT) are read for their types but reported only where they are checked.
	MYPYPATH=$(TRT_STUBS) $(VENV)/bin/python -m mypy --strict --follow-imports=silent molmo_export/trt runtime/molmo_runtime/backends/trt.py runtime/molmo_runtime/cuda_api.py runtime/molmo_runtime/trt_buffers.py runtime/molmo_runtime/trt_env.py runtime/molmo_runtime/prefill.py runtime/molmo_runtime/tolerances.py runtime/molmo_runtime/huge_pages.py runtime/molmo_runtime/mapped_files.py

# A wheel of everything (runtime, calibration, exporter, bench); its extras as in pyproject.toml.
wheel: $(VENV)/.installed
	$(VENV)/bin/python -m pip wheel -q --no-deps -w dist .
	@ls dist/molmo_export-*.whl

clean:
	rm -rf $(VENV) $(RT_VENV) $(TRITON_VENV) out build dist
