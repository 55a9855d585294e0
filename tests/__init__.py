"""wgkex tests, run with trial."""
