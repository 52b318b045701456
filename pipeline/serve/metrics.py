"""The server's Prometheus metrics (GET /metrics), in a registry of its own (one per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("emde_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("emde_request_seconds", "time to answer a prediction request", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_items = Histogram("emde_batch_items", "items in one Predictor call", buckets=BATCH_BUCKETS,
                                     registry=r)
        self.batch_seconds = Histogram("emde_batch_seconds", "time of one Predictor call", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.errors = Counter("emde_errors", "refused or failed requests by kind", ["kind"], registry=r)
        self.queued = Gauge("emde_queued_items", "items waiting for a Predictor call", registry=r)
        self.swaps = Counter("emde_model_swaps", "models swapped in while serving", registry=r)
        self.version = Gauge("emde_model_info", "the model version served (value 1)", ["version"], registry=r)
