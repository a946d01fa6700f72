"""Direct methods between local identities through the hub's HTTPS API, as
edgeHub serves it, with the upstream down: a module calls a child device
(`POST /twins/{d}/methods`) and another module
(`POST /twins/{edge}/modules/{m}/methods`) with its SAS token and
`x-ms-edge-moduleId`; 404 away, 504 silent, 401 for a bad or foreign caller,
400 for a malformed request. The request is the one the Azure IoT device
SDK's `ModuleClient.invoke_method` makes (its URL, headers and body, read
from the SDK's source); it is sent with Python's own HTTP client because the
SDK builds that client only from an edge environment whose MQTT side cannot
be pointed at a test port."""

from __future__ import annotations

import http.client
import json
import ssl
import threading

import paho.mqtt.client as mqtt

from authkit import EDGE_ID, Identity, auth_args, make_certs, publish_scope, try_connect, wait_scope
from helpers import free_port, port_accepts, wait_until


def api_call(port: int, ca, path: str, body, caller: Identity | None, module_id: str | None = None,
             token: str | None = None) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=60)
    headers = {"Content-Type": "application/json", "User-Agent": "azure-iot-device-test"}
    if caller is not None:
        headers["Authorization"] = token or caller.token()
        headers["x-ms-edge-moduleId"] = module_id or caller.client_id
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", f"{path}?api-version=2019-10-01", body=raw, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else {})


def answer_calls(c, status: int = 200, count: int = 1) -> threading.Thread:
    """A paho device answering ``count`` method calls with its payload echoed."""
    def run():
        served = 0
        prefix = "$iothub/methods/POST/"
        while served < count:
            c._wait(lambda: any(t.startswith(prefix) for t, _ in c.messages), 30, "a method call")
            with c.cond:
                i = next(i for i, (t, _) in enumerate(c.messages) if t.startswith(prefix))
                topic, payload = c.messages.pop(i)
            rid = topic.split("$rid=", 1)[1]
            name = topic[len(prefix):].split("/?", 1)[0]
            c.publish(f"$iothub/methods/res/{status}/?$rid={rid}",
                      json.dumps({"echo": json.loads(payload), "name": name}).encode())
            served += 1
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_module_calls_a_device_and_another_module_through_the_api_with_the_upstream_down(
    upstream, hub_factory, clients, tmp_path_factory
):
    certs = make_certs(tmp_path_factory.mktemp("api-certs"))
    api_port = free_port()
    mod1, mod2, child1 = Identity.module("mod1"), Identity.module("mod2"), Identity.child("child1")
    stranger = Identity.module("stranger")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args() + [
        "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]),
        "--api-listen", f"127.0.0.1:{api_port}"])
    wait_until(lambda: port_accepts(api_port), 20, "the API listener")
    publish_scope(upstream, [mod1, mod2, child1])
    wait_scope(hub, 3)
    upstream.stop()
    hub.wait_metric("edgehub_upstream_connected", lambda v: v == 0, 15, "upstream down")

    rc, d1 = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0 and d1.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])
    rc, m2 = try_connect(hub.port, clients, protocol=mqtt.MQTTv5, **mod2.credentials())
    assert rc == 0 and m2.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])

    device = answer_calls(d1)
    status, body = api_call(api_port, certs["ca"], "/twins/child1/methods",
                            {"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 30},
                            mod1)
    device.join(5)
    assert (status, body) == (200, {"status": 200, "payload": {"echo": {"delay": 1}, "name": "reboot"}})

    module = answer_calls(m2, status=201)
    status, body = api_call(api_port, certs["ca"], f"/twins/{EDGE_ID}/modules/mod2/methods",
                            {"methodName": "ping", "payload": "hi", "responseTimeoutInSeconds": 30}, mod1)
    module.join(5)
    assert (status, body) == (200, {"status": 201, "payload": {"echo": "hi", "name": "ping"}})

    # not connected: 404; connected but silent: 504
    status, body = api_call(api_port, certs["ca"], f"/twins/{EDGE_ID}/modules/mod1/methods",
                            {"methodName": "m", "payload": None}, mod2)
    assert status == 404 and "not connected" in body["message"]
    status, body = api_call(api_port, certs["ca"], "/twins/child1/methods",
                            {"methodName": "slow", "payload": None, "responseTimeoutInSeconds": 5}, mod1)
    assert status == 504 and "did not answer" in body["message"]

    # a bad or foreign caller: 401
    for caller, kw in [
        (None, {}),
        (mod1, {"token": mod2.token()}),  # mod2's token presented as mod1
        (mod1, {"token": "SharedAccessSignature sr=x&sig=y&se=1"}),
        (stranger, {}),  # not in the scope
    ]:
        status, body = api_call(api_port, certs["ca"], "/twins/child1/methods",
                                {"methodName": "m", "payload": None}, caller, **kw)
        assert status == 401, (caller, kw, body)

    # a malformed request: 400
    for bad in [
        b"not json",
        {"payload": 1},  # no methodName
        {"methodName": "x" * 101, "payload": 1},
        {"methodName": "m", "payload": 1, "responseTimeoutInSeconds": 301},
        {"methodName": "m", "payload": "x" * (128 * 1024)},
    ]:
        status, body = api_call(api_port, certs["ca"], "/twins/child1/methods", bad, mod1)
        assert status in (400, 413), (bad if isinstance(bad, bytes) else str(bad)[:80], status, body)
    assert hub.proc.poll() is None


SDK_INVOKE = r'''
import json, sys
from azure.iot.device import IoTHubModuleClient
args = json.loads(sys.argv[1])
client = IoTHubModuleClient.create_from_edge_environment()
try:
    print(json.dumps(client.invoke_method(args["params"], device_id=args["device"], module_id=args.get("module"))))
finally:
    client.shutdown()
'''


def test_an_sdk_module_invokes_a_method_on_a_device_through_the_api(
    sdk_python, upstream, hub_factory, clients, tmp_path_factory, tmp_path
):
    import os
    import subprocess

    certs = make_certs(tmp_path_factory.mktemp("api-sdk-certs"))
    api_port = free_port()
    mod1, child1 = Identity.module("mod1"), Identity.child("child1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args() + [
        "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]),
        "--api-listen", f"127.0.0.1:{api_port}"])
    wait_until(lambda: port_accepts(api_port), 20, "the API listener")
    publish_scope(upstream, [mod1, child1])
    wait_scope(hub, 2)
    rc, d1 = try_connect(hub.port, clients, **child1.credentials())
    assert rc == 0 and d1.subscribe_result(["$iothub/methods/POST/#"]) in ([0], [1])
    device = answer_calls(d1)

    # The SDK's development fallback for a module in an edge environment:
    # these two variables (its HTTP path honours a port in GatewayHostName).
    env = dict(os.environ,
               EdgeHubConnectionString=mod1.connection_string(gateway=f"localhost:{api_port}"),
               EdgeModuleCACertificateFile=str(certs["ca"]))
    args = {"params": {"methodName": "getStatus", "payload": {"verbose": True}, "responseTimeoutInSeconds": 30},
            "device": "child1"}
    r = subprocess.run([str(sdk_python), "-c", SDK_INVOKE, json.dumps(args)], env=env, capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    device.join(5)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    result = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert result == {"status": 200, "payload": {"echo": {"verbose": True}, "name": "getStatus"}}
