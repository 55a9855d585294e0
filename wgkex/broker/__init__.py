"""The wgkex broker: HTTP key exchange API and the picture of the workers."""
