# The two commands of the README:
#   make figures   regenerate figures/ on the embedded simulated data (PROFILE=ci|quick|paper)
#   make test      run the test suite (pytest + nbval over the notebooks at their ci-sized defaults)
# Both create/update the local virtualenv .venv first, so nothing else is needed.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PROFILE ?= ci
STAMP   = $(VENV)/.installed

.PHONY: figures test bench browser venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

figures: $(STAMP)
	$(VENV)/bin/omnijet figures --profile $(PROFILE)

# Debian's chromium for the real-browser test (the test skips, saying why, if it is missing).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 -p no:cacheprovider

bench: $(STAMP)
	$(VENV)/bin/omnijet bench

clean:
	rm -rf notebooks/executed .pytest_cache
