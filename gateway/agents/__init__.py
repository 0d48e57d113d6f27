"""Launchers that point a coding agent at a running gateway: ``mlx-gateway-codex`` and
``mlx-gateway-claude``."""
