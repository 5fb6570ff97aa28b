"""The OpenAI-compatible HTTP API: request models, errors, image loading, auth, routes."""
