"""Launchers: torchrun (this package) and, later, Ray."""
