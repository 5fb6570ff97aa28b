"""Monitoring: how Prometheus scrapes a deployment (`scrape`), the alert rules (`alerts`), the
operator's own metrics (`operator_metrics`) and the Grafana dashboards generator (`dashboards`, dev only)."""
