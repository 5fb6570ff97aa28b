# The two commands a newcomer needs (README): `make serve` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup serve test test-quick binaries crd monitoring dashboard-pictures
setup:
	@scripts/setup.sh

## Run the serving stack on a local Ray (CPU) with the tiny built-in model.
serve: setup
	@.venv/bin/dotsvlm serve $(ARGS)

## The whole test suite: builds missing control-plane binaries, then runs every test.
test: setup binaries
	@$(PY) -m pytest $(PYTEST_ARGS)

## Quick subset while you work: no slow end-to-end tests.
test-quick: setup
	@$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

binaries:
	@tests/cluster/build-binaries.sh >/dev/null

## Regenerate the CRD from the models, for kubectl (crds/) and for the Helm chart (a copy it templates).
crd: setup
	@.venv/bin/dotsvlm crd > crds/dotsvlm.io_dotsvlmdeployments.yaml
	@cp crds/dotsvlm.io_dotsvlmdeployments.yaml charts/dotsvlm-operator/files/crds/
	@cp crds/kopf-peering.yaml charts/dotsvlm-operator/crds/

## Regenerate the chart's Grafana dashboards and alert rules from code (monitoring/dashboards.py, alerts.py).
monitoring: setup
	@$(PY) -m dotsvlm_operator.monitoring.generate

## Draw each Grafana dashboard from a live test run (local Ray + Prometheus) into docs/images/dashboards/.
## The pictures come from our matplotlib script (monitoring/render.py), not from Grafana.
dashboard-pictures: setup
	@DOTSVLM_DASHBOARD_PICTURES=$(CURDIR)/docs/images/dashboards $(PY) -m pytest -q \
		tests/serving/test_serving_observability.py -k every_dashboard_panel $(PYTEST_ARGS)
