"""Load balancers' counters in `/metrics`, read at scrape time from the snapshots their agents store.

Series per load balancer and per listener, pool and member of it (labelled by ids: their number is bounded by
the quotas, unlike anything a client sends), with the project, so a scrape can be split by tenant.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import select

from hackboot.core.db import session_scope
from hackboot.loadbalancers.models import LoadBalancer, LoadBalancerStats

LABELS = ["project", "load_balancer", "kind", "id"]
_COUNTERS = {"requests": "Requests (HTTP) or sessions (TCP)", "errors": "Errors (5xx, connection and response errors)",
             "bytes_in": "Bytes received from clients", "bytes_out": "Bytes sent to clients"}
_GAUGES = {"active_connections": "Connections open now",
           "response_time_ms": "Average response time over the last 1024 requests (ms)"}
_KINDS = {"listeners": "listener", "pools": "pool", "members": "member"}


def samples() -> Iterator[Metric]:
    counters = {k: CounterMetricFamily(f"hackboot_lb_{k}", doc, labels=LABELS) for k, doc in _COUNTERS.items()}
    gauges = {k: GaugeMetricFamily(f"hackboot_lb_{k}", doc, labels=LABELS) for k, doc in _GAUGES.items()}
    with session_scope(write=False) as s:
        rows = s.execute(select(LoadBalancer.project_id, LoadBalancerStats.load_balancer_id, LoadBalancerStats.stats)
                         .join(LoadBalancer, LoadBalancer.id == LoadBalancerStats.load_balancer_id)
                         .order_by(LoadBalancerStats.load_balancer_id)).tuples().all()
    for project_id, lb_id, stats in rows:
        for group, kind in _KINDS.items():
            for object_id, values in (stats or {}).get(group, {}).items():
                labels = [project_id, lb_id, kind, object_id]
                for name, family in counters.items():
                    family.add_metric(labels, float(values.get(name, 0)))
                for name, gauge in gauges.items():
                    gauge.add_metric(labels, float(values.get(name, 0)))
    yield from counters.values()
    yield from gauges.values()
