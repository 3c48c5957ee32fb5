"""Deployment: the Serve application builder, `serve.yaml`, `ray up` cluster configs."""
