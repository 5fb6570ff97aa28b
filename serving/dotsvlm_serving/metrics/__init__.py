"""dotsvlm's metrics: `catalog` (names, types, labels; no ray) and `publish` (Ray Serve replicas)."""
