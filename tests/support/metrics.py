"""/metrics as Prometheus scrapes it, parsed into samples a test can index."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: Metric name -> label pairs (sorted; ``pid`` dropped unless kept) -> value, summed over
#: what differs only by the labels dropped.
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse_metrics(text: str, keep_pid: bool = False) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if keep_pid or k != "pid"))
            bucket = samples.setdefault(sample.name, {})
            bucket[labels] = bucket.get(labels, 0) + sample.value
    return samples


def scrape(system: Any, keep_pid: bool = False) -> Samples:
    """GET /metrics of a web server (or of a system's web server), parsed."""
    web = system.web if hasattr(system, "web") else system
    status, text = web.get("/metrics")
    assert status == 200
    return parse_metrics(text, keep_pid)
