"""/metrics: Prometheus text, adding up the web and the Celery processes of the host."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def scrape(system: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, text = system.web.get("/metrics")
    assert status == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            bucket = samples.setdefault(sample.name, {})
            bucket[labels] = bucket.get(labels, 0) + sample.value
    return samples


def test_metrics_cover_the_fleet_the_decisions_and_the_latencies(system: Any, client: Any, live_nodes: Any) -> None:
    node = live_nodes(system.web, {"m": "ready"}).wait_ready()
    result = client.send_task("dispatcher.submit_job", kwargs={"job_type": "t", "required_models": ["m"]})
    node.succeed(node.take_job(), "ok")
    assert result.get(timeout=10) == "ok"
    waiting = client.send_task("dispatcher.submit_job", kwargs={"job_type": "t", "required_models": ["absent"]})
    from tests.support import wait_for

    m = wait_for(lambda: (s := scrape(system)).get("dispatcher_jobs_finished_total") and s, what="metrics")
    assert m["dispatcher_nodes"][(("status", "ready"),)] >= 1
    assert m["dispatcher_status_transitions_total"][(("from_status", "registering"), ("to_status", "ready"))] >= 1
    assert m["dispatcher_heartbeats_total"][(("healthy", "true"),)] >= 3
    assert m["dispatcher_dispatch_decisions_total"][(("outcome", "assigned"),)] >= 1, "counted in the worker"
    wait_for(lambda: scrape(system)["dispatcher_jobs_waiting"][()] >= 1, what="the waiting job counted")
    m = scrape(system)
    assert m["dispatcher_exclusions_total"][(("reason", "ModelNotAvailable"),)] >= 1
    assert m["dispatcher_jobs_finished_total"][(("state", "succeeded"),)] >= 1
    assert m["dispatcher_job_submit_to_assign_seconds_count"][()] >= 1
    assert m["dispatcher_job_assign_to_result_seconds_count"][()] >= 1
    assert m["dispatcher_lua_script_seconds_count"][(("script", "submit_job"),)] >= 1
    assert m["dispatcher_lua_script_seconds_count"][(("script", "record_heartbeat"),)] >= 3
    assert m["dispatcher_web_sessions"][()] >= 1
    assert m["dispatcher_partition_suspected"][()] == 0
    assert m["dispatcher_results_unapplied"][()] == 0, "every result applied"
    client.send_task("dispatcher.cancel_job", kwargs={"job_id": waiting.id}).get(timeout=10)
