# `make bench` runs every benchmark and writes benchmarks/RESULTS.md and benchmarks/results.png;
# `make bench QUICK=1` is the fast smoke run (results go to benchmarks/results/*_quick.json).
PYTHON ?= python
BENCH_ARGS ?= $(if $(QUICK),--quick,)

.PHONY: bench
bench:
	$(PYTHON) benchmarks/plan_time.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/plan_quality.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/runtime.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/finetune.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/checkpoint.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/generate.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/generate.py --prefix
	$(PYTHON) benchmarks/decode_limits.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/call_check.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/inprocess.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/train_2d.py $(BENCH_ARGS)
	$(PYTHON) benchmarks/sequence_parallel.py $(BENCH_ARGS)
	$(if $(QUICK),,$(PYTHON) benchmarks/blocks_check.py --numerics)  # every family: not in the quick run
	$(PYTHON) benchmarks/report.py $(BENCH_ARGS)

.PHONY: coverage
coverage:  # every transformers causal-LM family on 2 gloo ranks (tens of minutes on 2 cores)
	TPFX_FAMILIES=all $(PYTHON) -m pytest -q -s -m slow tests/test_families.py

.PHONY: fuzz
fuzz:  # the plan fuzzer's large profile: FUZZ_N random models x world sizes 2..8 on simulated ranks
	cd tests && $(PYTHON) fuzz.py $(or $(FUZZ_N),500) $(if $(FUZZ_SP),--sp,)
