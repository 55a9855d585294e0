"""The wgkex worker: turns keys from MQTT into WireGuard peers, routes and FDB entries."""
