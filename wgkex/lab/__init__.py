"""A local wgkex deployment in network namespaces, for the demo, e2e tests and benchmarks."""
