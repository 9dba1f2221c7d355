# Convenience wrappers.  The README's commands are `bash scripts/run demo` and
# `bash scripts/run test` because `make` is not installed on a fresh Debian 12
# (bootstrap installs it, so these work afterwards).
.PHONY: demo test bench bootstrap

demo test:
	bash scripts/run $@

# make bench ARGS="--quick"
bench:
	bash scripts/run bench $(ARGS)

bootstrap:
	bash scripts/bootstrap.sh
