"""The front door on Ray Serve: the engine deployment, the gateway (gRPC and HTTP), the
OpenAI-compatible API, auth, metrics and request validation."""
