"""Offline authentication with the real Azure IoT device SDK for Python:
child devices and modules connect to the hub as their gateway over TLS on
port 8883 (the only port the SDK uses), with SAS keys from the scope the hub
synced from the cloud; and the TLS listener itself (TLS 1.2 and 1.3).

The SDK runs in its own virtualenv (it pins paho-mqtt<2): see authkit.py."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
import pytest

from authkit import (
    EDGE_ID,
    SDK_PORT,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V5_BAD_CREDENTIALS,
    DeviceClient,
    Identity,
    auth_args,
    client_ssl_context,
    describe_sdk,
    log_since,
    log_size,
    make_certs,
    new_key,
    publish_scope,
    refusal_lines,
    refused,
    require_port_free,
    run_sdk,
    start_gateway,
    wait_scope,
    wait_tls_listener,
)
from helpers import free_port



@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("auth-certs"))



def assert_sent(out: dict, messages: list[str]) -> None:
    assert out.get("error") is None and out.get("connected"), f"the SDK could not connect:\n{describe_sdk(out)}"
    assert out.get("sent") == messages, f"the SDK did not send everything:\n{describe_sdk(out)}"


def assert_refused_as_bad_credentials(out: dict) -> None:
    assert not out.get("connected"), f"the SDK connected with a wrong key:\n{describe_sdk(out)}"
    assert out.get("error") == "CredentialError", f"expected CredentialError:\n{describe_sdk(out)}"
    chain = " | ".join(out.get("error_chain", [])).lower()
    # paho 1.x names CONNACK return code 4 "Connection Refused: bad user name or password."
    assert "bad user name or password" in chain, (
        f"expected CONNACK return code 4 (bad user name or password), got: {chain}\n{describe_sdk(out)}"
    )


def test_an_sdk_child_device_connects_through_the_gateway_and_its_telemetry_reaches_the_upstream(
    sdk_python, certs, upstream, collector_factory, hub_factory, tmp_path, record_property
):
    collector = collector_factory(upstream)
    child1, mod1 = Identity.child("child1"), Identity.module("mod1")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1, mod1])
    wait_scope(hub, 2)
    before = refused(hub)

    msgs = ['{"n":1,"case":"a"}', '{"n":2,"case":"a"}']
    out = run_sdk(sdk_python, child1, certs["ca"], messages=msgs, properties={"marker": "sdk-a"},
                  log=tmp_path / "sdk-child1.log")
    record_property("sdk_version", out.get("sdk_version"))
    record_property("sdk_paho_version", out.get("paho_version"))
    assert_sent(out, msgs)

    want = {m.encode() for m in msgs}
    got = collector.wait_distinct_payloads(want, 30)
    for topic, payload in got:
        if payload in want:
            assert topic.startswith("devices/child1/messages/events/"), f"telemetry went upstream on {topic!r}"
            assert "marker=sdk-a" in topic, f"the SDK's property bag is not in the upstream topic {topic!r}"
    assert refused(hub) == before, "a refusal was counted for a good SDK device"


def test_an_sdk_device_authenticates_offline_after_a_restart_and_its_message_arrives_when_the_upstream_returns(
    sdk_python, certs, upstream_factory, collector_factory, hub_factory, tmp_path
):
    up = upstream_factory()
    up.start()
    collector = collector_factory(up)  # persistent session: keeps what arrives while it is away
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = start_gateway(hub_factory, up, certs)
    publish_scope(up, [child1, child2])
    wait_scope(hub, 2)

    # the cloud goes away, then the gateway restarts while offline
    up.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "upstream disconnected")
    hub.terminate()
    require_port_free(SDK_PORT)
    hub.start()
    wait_tls_listener(hub, SDK_PORT)
    wait_scope(hub, 2, timeout=15)  # from the encrypted cache
    assert hub.metric("edgehub_upstream_connected") == 0

    msgs = ['{"offline":1}', '{"offline":2}']
    out = run_sdk(sdk_python, child1, certs["ca"], messages=msgs, log=tmp_path / "sdk-offline.log")
    assert_sent(out, msgs)

    # the cached scope is enforced, not bypassed: a wrong key is still refused
    bad = run_sdk(sdk_python, child2, certs["ca"], key=new_key(), messages=['{"must":"not arrive"}'],
                  log=tmp_path / "sdk-offline-bad.log")
    assert_refused_as_bad_credentials(bad)

    up.start()
    got = collector.wait_distinct_payloads({m.encode() for m in msgs}, 60)
    topics = {t for t, p in got if p in {m.encode() for m in msgs}}
    assert all(t.startswith("devices/child1/messages/events/") for t in topics), topics
    assert all(p != b'{"must":"not arrive"}' for _, p in got)
    # and the scope is re-read from the cloud on reconnect
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 1, 30, "upstream reconnected")
    wait_scope(hub, 2)


def test_an_sdk_device_with_a_wrong_key_is_refused_while_the_same_device_with_its_key_connects(
    sdk_python, certs, upstream, collector_factory, hub_factory, tmp_path
):
    collector = collector_factory(upstream)
    child1, child2 = Identity.child("child1"), Identity.child("child2")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1, child2])
    wait_scope(hub, 2)
    before = refused(hub)
    offset = log_size(hub)

    out = run_sdk(sdk_python, child2, certs["ca"], key=new_key(), messages=['{"wrong":"key"}'],
                  log=tmp_path / "sdk-wrong.log")
    assert_refused_as_bad_credentials(out)
    after = hub.wait_metric("edgehub_auth_refused_total", lambda v: v >= before + 1, 10, "counts the refusal")
    lines = refusal_lines(log_since(hub, offset))
    assert lines, f"no log line about the refusal; hub log since:\n{log_since(hub, offset)[-3000:]}"
    assert hub.alive()

    # the same device with its (secondary) key is fine
    ok = run_sdk(sdk_python, child2, certs["ca"], key=child2.secondary, messages=['{"right":"key"}'],
                 log=tmp_path / "sdk-right.log")
    assert_sent(ok, ['{"right":"key"}'])
    got = collector.wait_payload(b'{"right":"key"}', 30)
    assert all(p != b'{"wrong":"key"}' for _, p in got)
    print(f"refusals counted: {before} -> {after}")


def test_an_sdk_module_client_of_the_edge_device_connects_and_sends_on_its_module_topic(
    sdk_python, certs, upstream, collector_factory, hub_factory, tmp_path
):
    collector = collector_factory(upstream)
    child1, mod1, mod2 = Identity.child("child1"), Identity.module("mod1"), Identity.module("mod2")
    hub = start_gateway(hub_factory, upstream, certs)
    publish_scope(upstream, [child1, mod1, mod2])
    wait_scope(hub, 3)

    msgs = ['{"module":"mod1"}']
    out = run_sdk(sdk_python, mod1, certs["ca"], messages=msgs, properties={"marker": "sdk-d"},
                  log=tmp_path / "sdk-mod1.log")
    assert_sent(out, msgs)
    got = collector.wait_payload(msgs[0].encode(), 30)
    topics = [t for t, p in got if p == msgs[0].encode()]
    assert topics and all(t.startswith(f"devices/{EDGE_ID}/modules/mod1/messages/events/") for t in topics), topics

    # a module key does not open another module
    bad = run_sdk(sdk_python, mod2, certs["ca"], key=mod1.primary, log=tmp_path / "sdk-mod2-bad.log")
    assert_refused_as_bad_credentials(bad)


def test_the_tls_listener_speaks_tls_1_2_and_1_3_and_authenticates_devices_over_it(
    certs, upstream, hub_factory, clients
):
    tls_port = free_port()
    child1 = Identity.child("child1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args(tls=certs, tls_port=tls_port))
    wait_tls_listener(hub, tls_port)
    publish_scope(upstream, [child1])
    wait_scope(hub, 1)

    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
            c = DeviceClient(tls_port, ssl_context=client_ssl_context(certs["ca"], version), protocol=proto,
                             **child1.credentials())
            clients.append(c)
            rc = c.connect()
            assert rc == V3_ACCEPTED, f"{version.name} MQTT{proto}: CONNACK {rc:#x}, expected 0"
            tls_seen = c.client.socket().version()
            assert tls_seen == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name], tls_seen
            assert c.publish_result("devices/child1/messages/events/", f"{version.name}".encode()) == 0
            c.close()

        bad = DeviceClient(tls_port, ssl_context=client_ssl_context(certs["ca"], version),
                           **{**child1.credentials(), "password": Identity.child("child1").token()})
        clients.append(bad)
        assert bad.connect() == V3_BAD_CREDENTIALS
        bad5 = DeviceClient(tls_port, ssl_context=client_ssl_context(certs["ca"], version), protocol=mqtt.MQTTv5,
                            **{**child1.credentials(), "password": Identity.child("child1").token()})
        clients.append(bad5)
        assert bad5.connect() == V5_BAD_CREDENTIALS
    assert hub.alive()
