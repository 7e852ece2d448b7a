"""Ray Serve applications: the sharded model deployment and its OpenAI-compatible ingress."""
