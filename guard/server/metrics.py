"""Prometheus metrics for the guard (GET /metrics), on a registry of the server's own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest

# No *_created series: they double the exposition and no dashboard of ours reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class GuardMetrics:
    """The guard's counters and histograms. Names and labels:

    - misguard_requests_total{outcome}: answered requests; outcome = allowed | blocked | error | invalid | busy (429:
      the in-flight image budget was spent)
    - misguard_blocks_total{rail}: requests blocked by each rail (input | output)
    - misguard_fail_open_total{rail}: judge failures the policy let pass
    - misguard_out_of_domain_total{rail, decision}: verdicts the judge flagged out of domain, and what the policy
      made of them (allow | block)
    - misguard_errors_total{kind}: judge_error (a judge that failed or gave a score that is not a probability, NaN
      included) | judge_timeout | upstream_error | upstream_timeout | invalid_request | busy | request_timeout (a
      body not read within server.body_read_timeout_s, or headers begun and not finished within
      server.header_read_timeout_s; a connection that sends nothing is closed uncounted) | internal
    - misguard_judge_latency_seconds{rail}: from a check's submission to its verdict, queueing included
    - misguard_judge_batch_size, misguard_judge_batch_seconds: each engine call of the micro-batcher
    - misguard_upstream_latency_seconds: the upstream's whole answer
    - misguard_request_latency_seconds: the whole request, as the guard saw it
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("misguard_requests", "Requests answered, by outcome.", ["outcome"], registry=r)
        self.blocks = Counter("misguard_blocks", "Requests blocked, by rail.", ["rail"], registry=r)
        self.fail_open = Counter("misguard_fail_open", "Judge failures passed by a fail-open policy, by rail.",
                                 ["rail"], registry=r)
        self.out_of_domain = Counter("misguard_out_of_domain", "Verdicts the judge flagged out of domain, by rail "
                                     "and the decision the policy made.", ["rail", "decision"], registry=r)
        self.errors = Counter("misguard_errors", "Errors, by kind.", ["kind"], registry=r)
        self.judge_latency = Histogram("misguard_judge_latency_seconds", "Rail check latency, queueing included.",
                                       ["rail"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("misguard_judge_batch_size", "Checks per judge engine call.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("misguard_judge_batch_seconds", "Seconds per judge engine call.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("misguard_upstream_latency_seconds", "Upstream answer latency.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("misguard_request_latency_seconds", "Whole request latency.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        for outcome in ("allowed", "blocked", "error", "invalid", "busy"):
            self.requests.labels(outcome)
        for rail in ("input", "output"):
            self.blocks.labels(rail)
            self.fail_open.labels(rail)
            for decision in ("allow", "block"):
                self.out_of_domain.labels(rail, decision)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
