# Two commands do all the set-up: `make demo` and `make test`. Both (re)build .venv when it is
# missing or older than pyproject.toml / constraints.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
OUT ?= demo-out

.PHONY: demo test install gpu docs screenshot clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

# FAISS on the GPU: faiss-gpu in place of faiss-cpu (both install the module `faiss`, so one at a
# time). A rebuild of .venv (pyproject.toml or constraints.txt changed) brings faiss-cpu back over
# it: run `make gpu` again after it (removing faiss-cpu takes the files the two share, so faiss-gpu
# is reinstalled whole, its CUDA libraries by the first install).
gpu: $(STAMP)
	$(VENV)/bin/pip uninstall -y -q faiss-cpu
	$(VENV)/bin/pip install -q -c constraints.txt 'faiss-gpu>=1.15'
	$(VENV)/bin/pip install -q -c constraints.txt --force-reinstall --no-deps 'faiss-gpu>=1.15'
	$(VENV)/bin/python -c "import faiss; print('faiss', faiss.__version__, 'GPUs:', faiss.get_num_gpus())"

demo: $(STAMP)
	$(VENV)/bin/memclean demo --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The documentation site, offline, into site/: the reference pages are generated from the code as
# it is built (docs/hooks.py); a broken link or a missing page fails the build.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# docs/assets/report.png, the README's picture: the demo's report in headless Chromium.
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
screenshot: $(STAMP)
	test -f $(OUT)/_COMPLETE || $(VENV)/bin/memclean demo --out $(OUT)
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1500 \
		--screenshot=$(CURDIR)/docs/assets/report.png file://$(abspath $(OUT))/report.html

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache site
