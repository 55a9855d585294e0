"""wgkex: WireGuard key exchange for Freifunk mesh networks."""
