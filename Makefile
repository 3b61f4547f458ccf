# The two set-up commands of README.md. Both create the venv on first use (scripts/env.sh).
.PHONY: demo test lint bench
demo:
	scripts/env.sh python workflows/augment.py --config configs/augment.yaml \
	  --input data/samples --output out/demo --allow-random-weights
test:
	scripts/env.sh python -m pytest
lint:
	scripts/env.sh ruff check .
bench:
	scripts/env.sh python bench/bench_dr2.py
