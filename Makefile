# Two commands on a fresh machine:  make demo  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast install pretrain
install: $(VENV)/.installed

# The package, editable, with every backend and the test tools, at the
# tested versions of constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[all,test]'
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# The unit tests alone (no whole runs; docs/development.md), for the edit loop.
test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

demo: install
	$(PY) -m demo.run

# Re-creates the bundled upstream model (big_transfer/assets/) from scratch: installs
# Fashion-MNIST (Debian) where missing, then trains with the small recipe
# (about 8 min on 2 busy CPU cores); the .npz lands in runs/pretrain/NAME/model.npz.
PRETRAIN_NAME ?= BiT-R14x0.5-FashionMNIST
pretrain: install
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update && apt-get install -y dataset-fashion-mnist)
	$(PY) -m bit_pytorch.pretrain \
	  --recipe bit_small_fashion_mnist --name $(PRETRAIN_NAME) \
	  --logdir runs/pretrain --workers 1
