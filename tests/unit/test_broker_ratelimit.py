"""The per-address token bucket (driven by a Clock) and which address a request counts against."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wgkex.broker.ratelimit import RateLimiter, bucket_key, client_address, parse_networks


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = RateLimiter(rate=10, burst=200, clock=self.clock)

    def test_burst_then_refused(self) -> None:
        """200 requests at once pass, the 201st waits (Retry-After >= 1)."""
        for _ in range(200):
            self.assertEqual(self.limiter.acquire("192.0.2.1"), 0)
        self.assertEqual(self.limiter.acquire("192.0.2.1"), 1)

    def test_refill_at_rate(self) -> None:
        """After the burst, 10 tokens come back per second."""
        for _ in range(200):
            self.limiter.acquire("192.0.2.1")
        self.clock.advance(1.0)
        passed = sum(1 for _ in range(20) if self.limiter.acquire("192.0.2.1") == 0)
        self.assertEqual(passed, 10)

    def test_refused_requests_do_not_cost(self) -> None:
        """Hammering while refused does not push the next token further away."""
        for _ in range(200):
            self.limiter.acquire("192.0.2.1")
        for _ in range(1000):
            self.limiter.acquire("192.0.2.1")
        self.clock.advance(0.1)
        self.assertEqual(self.limiter.acquire("192.0.2.1"), 0)

    def test_retry_after_rounds_up(self) -> None:
        """With a slow rate, Retry-After is the whole seconds until the next token."""
        limiter = RateLimiter(rate=0.25, burst=1, clock=self.clock)
        self.assertEqual(limiter.acquire("a"), 0)
        self.assertEqual(limiter.acquire("a"), 4)
        self.clock.advance(1.5)
        self.assertEqual(limiter.acquire("a"), 3)
        self.clock.advance(2.5)
        self.assertEqual(limiter.acquire("a"), 0)

    def test_addresses_are_independent(self) -> None:
        """One address exhausting its bucket does not affect another."""
        for _ in range(201):
            self.limiter.acquire("192.0.2.1")
        self.assertEqual(self.limiter.acquire("192.0.2.2"), 0)

    def test_ipv6_counted_per_64(self) -> None:
        """Addresses of one IPv6 /64 share a bucket; another /64 has its own."""
        limiter = RateLimiter(rate=1, burst=2, clock=self.clock)
        self.assertEqual(limiter.acquire("2001:db8:1:2::1"), 0)
        self.assertEqual(limiter.acquire("2001:db8:1:2::ffff"), 0)
        self.assertNotEqual(limiter.acquire("2001:db8:1:2:abcd::9"), 0)
        self.assertEqual(limiter.acquire("2001:db8:1:3::1"), 0)

    def test_bucket_keys(self) -> None:
        """IPv4 stays as it is, IPv4-mapped IPv6 is its IPv4 address, IPv6 its /64."""
        self.assertEqual(bucket_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(bucket_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(bucket_key("2001:db8::1"), "2001:db8::/64")

    def test_table_stays_bounded(self) -> None:
        """Many distinct addresses never grow the table past its limit."""
        limiter = RateLimiter(rate=10, burst=200, clock=self.clock, max_entries=100)
        for i in range(1000):
            limiter.acquire(f"10.0.{i // 256}.{i % 256}")
            self.clock.advance(0.001)
        self.assertLessEqual(len(limiter), 100)

    def test_idle_full_buckets_pruned_first(self) -> None:
        """When the table is full, buckets that refilled completely are dropped; busy ones stay."""
        limiter = RateLimiter(rate=10, burst=20, clock=self.clock, max_entries=3)
        for _ in range(20):
            limiter.acquire("busy")
        limiter.acquire("idle1")
        limiter.acquire("idle2")
        self.clock.advance(1.0)  # the idle buckets used one token each: full again after 0.1 s
        limiter.acquire("busy")
        limiter.acquire("new")
        self.assertEqual(len(limiter), 2)
        # The busy bucket kept its state: 9 tokens left, not a fresh burst of 20.
        self.assertEqual(sum(1 for _ in range(20) if limiter.acquire("busy") == 0), 9)

    def test_invalid_settings_refused(self) -> None:
        """A rate of 0 or a burst below 1 is a programming error."""
        self.assertRaises(ValueError, RateLimiter, 0, 10, self.clock)
        self.assertRaises(ValueError, RateLimiter, 1, 0, self.clock)


class ClientAddressTests(SynchronousTestCase):
    trusted = parse_networks(["192.0.2.10", "198.51.100.0/24"])

    def test_connection_address(self) -> None:
        """Without a trusted proxy the connection's address is the client."""
        peer = IPv4Address("TCP", "203.0.113.5", 4242)
        self.assertEqual(client_address(peer, None, self.trusted), "203.0.113.5")

    def test_forwarded_for_ignored_from_untrusted_peer(self) -> None:
        """X-Forwarded-For from an untrusted peer is ignored (anyone can send it)."""
        peer = IPv4Address("TCP", "203.0.113.5", 4242)
        self.assertEqual(client_address(peer, [b"1.2.3.4"], self.trusted), "203.0.113.5")

    def test_forwarded_for_from_trusted_proxy(self) -> None:
        """From a trusted proxy, the right-most X-Forwarded-For entry is the client."""
        peer = IPv4Address("TCP", "192.0.2.10", 4242)
        self.assertEqual(client_address(peer, [b"10.9.9.9, 203.0.113.7"], self.trusted), "203.0.113.7")

    def test_chain_of_trusted_proxies_skipped(self) -> None:
        """Trusted hops are skipped from the right; the client's own claims further left are not believed."""
        peer = IPv4Address("TCP", "192.0.2.10", 4242)
        header = [b"6.6.6.6, 203.0.113.7", b"198.51.100.3"]
        self.assertEqual(client_address(peer, header, self.trusted), "203.0.113.7")

    def test_all_hops_trusted(self) -> None:
        """If every hop is a trusted proxy, the left-most is used."""
        peer = IPv4Address("TCP", "192.0.2.10", 4242)
        self.assertEqual(client_address(peer, [b"198.51.100.1, 198.51.100.2"], self.trusted), "198.51.100.1")

    def test_ipv6_and_mapped(self) -> None:
        """IPv6 peers and IPv4-mapped trusted proxies work."""
        peer = IPv6Address("TCP", "::ffff:192.0.2.10", 4242)
        self.assertEqual(client_address(peer, [b"2001:db8::5"], self.trusted), "2001:db8::5")
        peer6 = IPv6Address("TCP", "2001:db8::9", 4242)
        self.assertEqual(client_address(peer6, [b"1.2.3.4"], self.trusted), "2001:db8::9")

    def test_unix_socket_peer_trusted(self) -> None:
        """A unix socket (only local processes connect) is treated as a trusted proxy."""
        self.assertEqual(client_address(UNIXAddress(b"/run/x"), [b"203.0.113.9"], ()), "203.0.113.9")
        self.assertEqual(client_address(UNIXAddress(b"/run/x"), None, ()), "unix")

    def test_empty_header(self) -> None:
        """An empty X-Forwarded-For falls back to the connection."""
        peer = IPv4Address("TCP", "192.0.2.10", 4242)
        self.assertEqual(client_address(peer, [b" , "], self.trusted), "192.0.2.10")
