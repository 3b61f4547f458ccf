# The two set-up commands of README.md. Both create the venv on first use (scripts/env.sh).
.PHONY: demo test test-fast lint bench
# Without weights the demo runs a small random-init network (labelled random-init:tiny in the log
# and the manifest): it shows the pipeline, not restorations. With weights:
#   scripts/env.sh python workflows/augment.py --dr2.weights /path/DR2_FFHQ.pkl --input ... --output ...
demo:
	scripts/env.sh python workflows/augment.py --config configs/augment.yaml \
	  --input data/samples --output out/demo --allow-random-weights true --dr2.architecture tiny
test:
	scripts/env.sh python -m pytest
# Everything but the end-to-end Ray cluster / job-submission tests (marked slow); CI runs the full `make test`.
test-fast:
	scripts/env.sh python -m pytest -m "not slow"
lint:
	scripts/env.sh ruff check .
bench:
	scripts/env.sh python bench/bench_dr2.py --arch tiny
