"""`GET /metrics`: the server and the cluster in Prometheus's text format (prometheus-client).

    halo_requests_total{endpoint, status}       HTTP answers (400s included)
    halo_finished_total{reason}                 jobs ended: stop, length, shutdown, cancelled, error
    halo_prompt_tokens_total, halo_completion_tokens_total
    halo_queue_length, halo_running             sequences waiting, being generated (a request's n
                                                choices count n)
    halo_batch_size, halo_max_batch             sequences in the running step, the most the mode
                                                batches (1: it runs one at a time)
    halo_steps_by_batch_total{batch}            model steps that carried each number of sequences
    halo_time_to_first_token_seconds            from the request's arrival in the queue (histogram)
    halo_time_per_output_token_seconds          mean over each request's tokens after its first
    halo_rank_group_share{rank}                 the share of MLP groups each rank holds (tensor)
    halo_rank_layer_share{rank}                 the share of the layers (pipeline)
    halo_rank_on_time_rate{rank}                its link's on-time rate as rank 0 measures it
    halo_rank_dropped_layers{rank}              layer-steps whose partial came late (recent steps)
    halo_rank_dropped_share{rank}               the importance that cost, per token (recent mean)
    halo_dropped_importance_share               importance dropped per token (recent mean)

The per-rank figures are whatever the mode reports in `health()["rank_stats"]` at scrape time.
Each app has its own registry, so several apps (tests) never share counters.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

RECENT = 16          # requests /health's ms_per_token is the mean over
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RANK_FIGURES = {"group_share": "share of the MLP groups this rank holds",
                "on_time_rate": "share of this rank's partials that arrived before their deadline",
                "layer_share": "share of the layers this rank holds (pipeline)",
                "dropped_layers": "layer-steps of recent tokens whose partial from this rank came late",
                "dropped_share": "importance dropped per token because this rank's partial came late "
                                 "(mean over recent tokens)"}


class RankCollector:
    """The mode's per-rank figures, read when Prometheus scrapes."""

    def __init__(self, health: Callable[[], dict]):
        self.health = health

    def collect(self):
        try:
            health = self.health()
        except RuntimeError:            # the mode's state changed while it was read: next scrape
            return
        rows = health.get("rank_stats", [])
        for name, help_text in RANK_FIGURES.items():
            family = GaugeMetricFamily(f"halo_rank_{name}", help_text, labels=["rank"])
            for row in rows:
                if name in row:
                    family.add_metric([str(row["rank"])], float(row[name]))
            yield family
        if health.get("max_batch") is not None:
            yield GaugeMetricFamily("halo_max_batch", "the most sequences one step carries in this mode",
                                    value=float(health["max_batch"]))
        if health.get("batch") is not None:
            yield GaugeMetricFamily("halo_batch_size", "sequences in the running step",
                                    value=float(health["batch"]))
        steps = health.get("steps_by_batch") or {}
        if steps:
            family = CounterMetricFamily("halo_steps_by_batch", "model steps by the sequences they carried",
                                         labels=["batch"])
            for batch, count in sorted(steps.items()):
                family.add_metric([str(batch)], float(count))
            yield family
        if "dropped_share" in health:
            yield GaugeMetricFamily("halo_dropped_importance_share",
                                    "importance dropped per token, mean over recent tokens",
                                    value=float(health["dropped_share"]))


class Metrics:
    def __init__(self, queued: Callable[[], int], running: Callable[[], int], health: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("halo_requests", "HTTP answers by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("halo_finished", "jobs ended, by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("halo_prompt_tokens", "prompt tokens of finished jobs", registry=r)
        self.completion_tokens = Counter("halo_completion_tokens", "tokens generated", registry=r)
        Gauge("halo_queue_length", "requests waiting", registry=r).set_function(queued)
        Gauge("halo_running", "requests being generated", registry=r).set_function(running)
        self.first_token = Histogram("halo_time_to_first_token_seconds",
                                     "from the request's arrival to its first token", registry=r,
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.per_token = Histogram("halo_time_per_output_token_seconds",
                                   "mean time per token after the first, per request", registry=r,
                                   buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1))
        r.register(RankCollector(health))
        self.recent = deque(maxlen=RECENT)      # seconds per token of the last requests

    def recent_ms_per_token(self) -> float | None:
        """Mean ms per token (after the first) over the last RECENT requests; None before one."""
        recent = list(self.recent)
        return round(1e3 * sum(recent) / len(recent), 2) if recent else None

    def answered(self, endpoint: str, status: int):
        self.requests.labels(endpoint, str(status)).inc()

    def done(self, done: dict):
        """A job's end, as the driver reported it (broker.Job.done)."""
        self.finished.labels(done["finish_reason"]).inc()
        self.prompt_tokens.inc(done["prompt_tokens"])
        self.completion_tokens.inc(done["completion_tokens"])
        if done.get("first_token_s") is not None:
            self.first_token.observe(done["first_token_s"])
        if done.get("per_token_s") is not None:
            self.per_token.observe(done["per_token_s"])
            self.recent.append(done["per_token_s"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
