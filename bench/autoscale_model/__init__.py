"""The pieces of `bench/autoscale_sim.py`: seeded traces, the per-stage cost model, the discrete-time
cluster simulator and the scaling strategies it compares (fixed pools, Ray Serve's default request-count
rule, dotsvlm's policy imported from `dotsvlm_serving.autoscaling.policy`)."""
