# The two commands of the README:
#   make figures   regenerate figures/$(PROFILE)/ on the embedded simulated data (PROFILE=ci|quick|paper, JOBS=2)
#   make test      run the test suite (pytest + nbval over the notebooks at their ci-sized defaults);
#                  it fails if the run changed a tracked file
# Both create/update the local virtualenv .venv first, so nothing else is needed.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PROFILE ?= ci
# notebooks run side by side where their inputs allow (omnijet figures --jobs)
JOBS    ?= 2
STAMP   = $(VENV)/.installed

.PHONY: figures test bench browser venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

figures: $(STAMP)
	$(VENV)/bin/omnijet figures --profile $(PROFILE) --jobs $(JOBS)

# Debian's chromium for the real-browser test (the test skips, saying why, if it is missing).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

# nbval runs copies of the notebooks in build/nbval: their figures go to build/figures (the committed
# gallery in figures/ stays as it is) and ../data is shared through build/data. The run must leave every
# tracked file as it found it: the state of the work tree against HEAD is compared before and after.
TRACKED = (git diff HEAD --binary 2>/dev/null || true) | cksum
test: $(STAMP) browser
	@mkdir -p build && $(TRACKED) > build/.tracked_before
	rm -rf build/nbval && mkdir -p build/nbval && cp notebooks/[0-9][0-9]_*.ipynb build/nbval/ && ln -sfn ../data build/data
	$(PY) -m pytest tests build/nbval --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 -p no:cacheprovider
	@$(TRACKED) | cmp -s - build/.tracked_before || { echo "error: the tests changed tracked files:"; \
	  git status --short --untracked-files=no; exit 1; }

bench: $(STAMP)
	$(VENV)/bin/omnijet bench

clean:
	rm -rf notebooks/executed build .pytest_cache
