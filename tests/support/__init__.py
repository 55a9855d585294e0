"""Helpers shared by the tests: real mosquitto, subprocesses, namespaces."""
