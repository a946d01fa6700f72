"""The Prometheus endpoint reports what the hub did."""

import urllib.error
import urllib.request

from helpers import LOOPBACK, Publisher, parse_prometheus

ALL_METRICS = [
    "edgehub_clients_connected",
    "edgehub_messages_received_total",
    "edgehub_queue_depth",
    "edgehub_queue_oldest_age_seconds",
    "edgehub_queue_bytes",
    "edgehub_messages_forwarded_total",
    "edgehub_messages_expired_total",
    "edgehub_messages_dropped_total",
    "edgehub_messages_refused_total",
    "edgehub_upstream_connected",
    "edgehub_upstream_reconnects_total",
    "edgehub_dead_letter_depth",
]

DROP_REASONS = ["store_refused", "slow_subscriber", "offline_queue_full", "corrupt_record", "device_queue_full",
                "module_input_full", "no_room"]


def http_status(url: str, method: str = "GET") -> tuple[int, dict]:
    """(status, headers) of one request; error statuses do not raise."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_metrics_endpoint_serves_every_documented_metric(hub_factory):
    hub = hub_factory(None)
    text = hub.metrics_text()
    m = parse_prometheus(text)
    missing = [name for name in ALL_METRICS if name not in m]
    assert not missing, f"missing metrics {missing} in:\n{text}"
    assert m["edgehub_upstream_connected"] == 0, "no upstream configured, yet upstream_connected != 0"


def test_metrics_count_received_and_forwarded_messages_and_upstream_connection(
    upstream, collector_factory, hub_factory, clients
):
    collector = collector_factory(upstream)
    hub = hub_factory(upstream, edge_id="edge-metrics")
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "== 1")

    n = 300
    p = Publisher(hub.port, inflight=50)
    clients.append(p.connect())
    assert hub.wait_metric("edgehub_clients_connected", lambda v: v >= 1, 10, ">= 1") >= 1
    for i in range(n):
        p.publish("devices/m1/messages/events/k=v", str(i).encode(), qos=1, key=i)
    p.wait_results(n, 30)
    assert len(p.acked) == n
    collector.wait_count(n, 60)

    hub.wait_metric("edgehub_messages_forwarded_total", lambda v: v >= n, 20, f">= {n}")
    hub.wait_metric("edgehub_queue_depth", lambda v: v == 0, 20, "== 0 after forwarding")
    m = hub.metrics()
    assert m["edgehub_messages_received_total"] >= n, m
    assert m["edgehub_messages_forwarded_total"] >= n, m
    assert m["edgehub_upstream_connected"] == 1, m
    assert m["edgehub_messages_expired_total"] == 0, m
    assert m["edgehub_queue_bytes"] == 0, m

    p.close()
    hub.wait_metric("edgehub_clients_connected", lambda v: v == 0, 10, "== 0 after the client left")

    upstream.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 30, "== 0 after the upstream stopped")


def test_every_drop_reason_is_a_labelled_series_from_the_start(hub_factory):
    hub = hub_factory(None)
    text = hub.metrics_text()
    for reason in DROP_REASONS:
        assert f'edgehub_messages_dropped_total{{reason="{reason}"}} 0' in text, text
    assert text.rstrip().endswith("# EOF"), "not a complete OpenMetrics page"


def test_a_path_other_than_metrics_the_status_page_and_its_json_is_not_found(hub_factory):
    hub = hub_factory(None)
    base = f"http://{LOOPBACK}:{hub.metrics_port}"
    for path in ["/metricsx", "/favicon.ico", "/metrics/extra", "/status", "/status.json/x"]:
        status, _ = http_status(base + path)
        assert status == 404, f"GET {path} answered {status}"
    assert http_status(base + "/metrics?format=text")[0] == 200
    assert http_status(base + "/")[0] == 200
    assert http_status(base + "/status.json")[0] == 200


def test_a_method_other_than_get_on_metrics_is_not_allowed(hub_factory):
    hub = hub_factory(None)
    status, headers = http_status(f"http://{LOOPBACK}:{hub.metrics_port}/metrics", method="POST")
    assert status == 405, f"POST /metrics answered {status}"
    assert headers.get("Allow") == "GET", headers
