# The README's two commands: `make run` (set up, fetch the model, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
DATA_DIR ?= ./data
export PYTHON VENV

.PHONY: venv lock run test test-slow proto bench peers peers-fidelity peers-speed clean

# exactly requirements.lock (checked each time: a venv made from another lock is made again)
venv:
	@tools/venv.sh

# resolve pyproject.toml's dependencies again in a new venv and rewrite requirements.lock
lock:
	tools/lock.sh

run: venv
	$(VENV)/bin/memsvc serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# issue 7 (make peers = both): memsvc beside kvpress and transformers' QuantizedCache on the same token ids (builds the peers'
# venv on first use; hours on 2 cores; a rerun continues where it stopped). Table and JSON on stdout.
peers: peers-fidelity peers-speed

peers-fidelity: venv
	$(PY) benchmarks/peers/run.py --parallel --workers 2 --lengths 1024,2048,3072,4096 \
		--peers snapkv,streamingllm,expected-attn,knorm,quanto4,quanto2,quanto4-pipeline,hqq4,hqq3,hqq2 \
		--out benchmarks/peers/out/full --figures benchmarks/figures

# resume-to-first-token of tiered sessions (a question appended) against re-prefill, and restoring a
# full-precision cache (policy full: what llama.cpp's slot restore reads back), at 1k/8k/32k
peers-speed: venv
	$(PY) benchmarks/resume_tiered.py
	$(PY) benchmarks/resume.py --policy full --lengths 1024 8192 32768 --context 33792

proto: venv
	$(PY) -m memsvc.proto.build

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
