"""Ray Serve deployments: Ingress (OpenAI API), VisionEncoder, TensorQueue, LLMServer."""
