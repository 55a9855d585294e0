"""The v2 worker choice: the weighted-deficit rule on constructed cases, pure and through the picture."""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_fakes import endpoint_data
from wgkex.broker.selection import Candidate, assess, choose
from wgkex.broker.workers import WorkerPicture


class ChooseTests(SynchronousTestCase):
    def test_no_candidates(self) -> None:
        """Without candidates nothing is chosen."""
        self.assertIsNone(choose([]))

    def test_weights_30_20_one_under_target(self) -> None:
        """Weights 30/20, 100 peers: targets 60/40; the worker with 30 (under 40) is chosen."""
        cands = [Candidate("big", 70, 30), Candidate("small", 30, 20)]
        self.assertEqual(choose(cands), "small")

    def test_weights_30_20_other_way_round(self) -> None:
        """Weights 30/20, the heavy worker under its 60% target is chosen."""
        cands = [Candidate("big", 50, 30), Candidate("small", 50, 20)]
        self.assertEqual(choose(cands), "big")

    def test_at_target_tie_goes_to_name(self) -> None:
        """Both exactly on target (60/40 of 100): equal deficits, the smaller name wins."""
        self.assertEqual(choose([Candidate("zeta", 60, 30), Candidate("alpha", 40, 20)]), "alpha")

    def test_tie_order_independent(self) -> None:
        """A tie is decided by name whatever order the candidates come in."""
        a = [Candidate("gw2", 5, 1), Candidate("gw1", 5, 1)]
        self.assertEqual(choose(a), "gw1")
        self.assertEqual(choose(list(reversed(a))), "gw1")

    def test_all_zero(self) -> None:
        """A fresh fleet (no peers anywhere) starts with the smallest name."""
        self.assertEqual(choose([Candidate("b", 0, 1), Candidate("a", 0, 5)]), "a")

    def test_negative_peers_count_as_zero(self) -> None:
        """A negative count never makes a worker look better than empty."""
        self.assertEqual(choose([Candidate("a", 0, 1), Candidate("b", -5, 1)]), "a")

    def test_weight_zero_drains(self) -> None:
        """A weight-0 worker is chosen only when no weighted worker is a candidate."""
        self.assertEqual(choose([Candidate("a-drained", 0, 0), Candidate("b", 100, 1)]), "b")
        self.assertEqual(choose([Candidate("a-drained", 7, 0), Candidate("b-drained", 3, 0)]), "b-drained")

    def test_assess_shares_and_order(self) -> None:
        """Target shares are weight/sum(weights); the chosen worker is listed first."""
        result = assess([Candidate("big", 70, 30), Candidate("small", 30, 20)])
        self.assertEqual([a.name for a in result], ["small", "big"])
        shares = {a.name: a.target_share for a in result}
        self.assertAlmostEqual(shares["big"], 0.6)
        self.assertAlmostEqual(shares["small"], 0.4)
        deficits = {a.name: a.deficit for a in result}
        self.assertAlmostEqual(deficits["big"], 10.0)
        self.assertAlmostEqual(deficits["small"], -10.0)


class PictureChoiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        weights = {"gw-a": 3, "gw-b": 1, "gw30": 30, "gw20": 20}
        self.picture = WorkerPicture(("ffmuc_welt", "ffmuc_muc"), lambda n: weights.get(n, 1), self.clock)

    def worker(self, name: str, peers: int, domain: str = "ffmuc_welt", status: str = "1") -> None:
        self.picture.handle(f"wireguard-worker/{name}/status", status.encode())
        self.picture.handle(f"wireguard-worker/{name}/{domain}/data", endpoint_data(f"{name}.example").encode())
        self.picture.handle(f"wireguard-metrics/{domain}/{name}/connected_peers", str(peers).encode())

    def test_weights_30_20(self) -> None:
        """Through the picture: 30/20 with 80/20 peers sends the next router to the 20."""
        self.worker("gw30", 80)
        self.worker("gw20", 20)
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw20")

    def test_offline_worker_not_chosen(self) -> None:
        """A worker whose status is 0 is never chosen, however empty it is."""
        self.worker("gw30", 500)
        self.worker("gw20", 0, status="0")
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw30")

    def test_metric_minus_one_not_chosen(self) -> None:
        """A worker reporting -1 peers for the domain (shutting down) is not a candidate."""
        self.worker("gw30", 500)
        self.worker("gw20", -1)
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw30")

    def test_no_data_for_domain_not_chosen(self) -> None:
        """Online with a metric but without data for the domain: not a candidate."""
        self.worker("gw30", 500)
        self.picture.handle("wireguard-worker/gw20/status", b"1")
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw20/connected_peers", b"0")
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw30")

    def test_only_workers_of_the_domain(self) -> None:
        """A worker serving another domain only is not a candidate for this one."""
        self.worker("gw30", 500)
        self.worker("gw20", 0, domain="ffmuc_muc")
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw30")
        self.assertEqual(self.picture.next_choice("ffmuc_muc"), "gw20")

    def test_peers_summed_over_domains(self) -> None:
        """peers(w) counts all of w's domains: a worker busy elsewhere gets fewer routers here."""
        self.worker("a", 10)
        self.worker("b", 10)
        self.picture.handle("wireguard-worker/a/ffmuc_muc/data", endpoint_data("a").encode())
        self.picture.handle("wireguard-metrics/ffmuc_muc/a/connected_peers", b"50")
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "b")

    def test_tie_by_name(self) -> None:
        """Equal weight, equal peers: the smaller name, every time."""
        self.worker("gw-z", 4)
        self.worker("gw-m", 4)
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw-m")

    def test_burst_spreads_by_weight(self) -> None:
        """40 choices over two empty workers weighted 3:1 end 30:10 (within one)."""
        self.worker("gw-a", 0)
        self.worker("gw-b", 0)
        counts: Counter[str] = Counter()
        for _ in range(40):
            choice = self.picture.choose("ffmuc_welt")
            assert choice is not None
            counts[choice[0]] += 1
        self.assertLessEqual(abs(counts["gw-a"] - 30), 1)
        self.assertLessEqual(abs(counts["gw-b"] - 10), 1)
        self.assertEqual(counts["gw-a"] + counts["gw-b"], 40)

    def test_choice_counts_locally_until_next_metric(self) -> None:
        """Choosing adds one peer locally; the worker's next metric replaces the count."""
        self.worker("gw-a", 5)
        self.picture.choose("ffmuc_welt")
        self.assertEqual(self.picture.workers["gw-a"].peers["ffmuc_welt"], 6)
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", b"5")
        self.assertEqual(self.picture.workers["gw-a"].peers["ffmuc_welt"], 5)

    def test_unchoose_takes_the_count_back(self) -> None:
        """A choice whose key could not be accepted is taken back."""
        self.worker("gw-a", 5)
        self.picture.choose("ffmuc_welt")
        self.picture.unchoose("gw-a", "ffmuc_welt")
        self.assertEqual(self.picture.workers["gw-a"].peers["ffmuc_welt"], 5)

    def test_choose_returns_the_domain_endpoint(self) -> None:
        """The chosen worker's data for the domain comes back with the choice."""
        self.worker("gw-a", 0)
        choice = self.picture.choose("ffmuc_welt")
        assert choice is not None
        self.assertEqual(choice[0], "gw-a")
        self.assertEqual(choice[1].address, "gw-a.example")
