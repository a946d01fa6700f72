"""Bad credentials and bad scope documents: every one is refused with the
right code (or rejected, keeping the previous scope), is counted and logged,
and the hub stays up."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse

from authkit import (
    API_VERSION,
    username_for,
    EDGE_ID,
    HUB_NAME,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V3_NOT_AUTHORIZED,
    V5_BAD_CREDENTIALS,
    V5_NOT_AUTHORIZED,
    Identity,
    auth_args,
    log_since,
    log_size,
    new_key,
    publish_scope,
    raw_connect,
    refusal_lines,
    refused,
    resource_uri,
    sas_token,
    scope_doc,
    try_connect,
    wait_log,
    wait_scope,
)

BAD = {V3_BAD_CREDENTIALS}
NOT_AUTH = {V3_NOT_AUTHORIZED}
EITHER = {V3_BAD_CREDENTIALS, V3_NOT_AUTHORIZED}  # where the feature's text allows both


def bad_credential_cases(a: Identity, b: Identity, m: Identity) -> list[tuple[str, str, object, object, set]]:
    """(what, client id, username, password, acceptable CONNACK return codes)."""
    now = int(time.time())
    key = a.primary
    sr_a = urllib.parse.quote(resource_uri("devA"), safe="")
    good_sig = sas_token(key, "devA").split("&sig=")[1].split("&se=")[0]
    return [
        ("username without the hub name", "devA", f"devA/?api-version={API_VERSION}", a.token(), EITHER),
        ("empty username", "devA", "", a.token(), EITHER),
        ("username that is not an IoT Hub username", "devA", "just some text", a.token(), EITHER),
        ("username of a hub not in --hub-name", "devA", f"otherhub.azure-devices.net/devA/?api-version={API_VERSION}",
         sas_token(key, "devA", hub="otherhub.azure-devices.net"), EITHER),
        ("username with a module part for a device", "devA", f"{HUB_NAME}/devA/nomodule/?api-version={API_VERSION}",
         a.token(), EITHER),
        ("username without password", "devA", a.username, None, EITHER),
        ("client id differs from the username's device", "devA", b.username, b.token(), NOT_AUTH),
        ("device not in the scope", "devZ", Identity.child("devZ").username, Identity.child("devZ").token(),
         NOT_AUTH),
        ("sig is not base64", "devA", a.username, sas_token(key, "devA", sig="%%%not*base64!!!"), BAD),
        ("sig is base64 of the wrong length", "devA", a.username,
         sas_token(key, "devA", sig=urllib.parse.quote(base64.b64encode(b"short").decode(), safe="")), BAD),
        ("sig made with another key", "devA", a.username, sas_token(new_key(), "devA"), BAD),
        ("sig of the other device's key", "devA", a.username, sas_token(b.primary, "devA"), BAD),
        ("se is not a number", "devA", a.username, sas_token(key, "devA", expiry="tomorrow"), BAD),
        ("se is empty", "devA", a.username, sas_token(key, "devA", expiry=""), BAD),
        ("se is negative", "devA", a.username, sas_token(key, "devA", expiry=-5), BAD),
        ("se has expired", "devA", a.username, sas_token(key, "devA", expiry=now - 3600), BAD),  # beyond the 5 min clock skew tolerance
        ("se changed after signing", "devA", a.username,
         f"SharedAccessSignature sr={sr_a}&sig={good_sig}&se={now + 999999}", BAD),
        ("sr for another device, signed with this device's key", "devA", a.username,
         sas_token(key, "devA", sr=urllib.parse.quote(resource_uri("devB"), safe="")), BAD),
        ("a valid token of another device", "devA", a.username, b.token(), BAD),
        ("sr for another hub", "devA", a.username, sas_token(key, "devA", hub="otherhub.azure-devices.net"), BAD),
        ("not a SharedAccessSignature", "devA", a.username, "hunter2", BAD),
        ("SharedAccessSignature without se", "devA", a.username,
         f"SharedAccessSignature sr={sr_a}&sig={good_sig}", BAD),
        ("SharedAccessSignature without sig", "devA", a.username,
         f"SharedAccessSignature sr={sr_a}&se={now + 3600}", BAD),
        ("empty password", "devA", a.username, "", EITHER),
        ("control characters and unicode as password", "devA", a.username,
         "\x00\x01\x1b[2J \u2603 \u202e SharedAccessSignature sr=&sig=&se=", BAD),
        ("device id in another letter case", "DEVA", username_for("DEVA"), sas_token(key, "DEVA"), NOT_AUTH),
        ("module token whose sr lacks the module", "gw1/mod1", username_for("gw1", "mod1"),
         sas_token(m.primary, "gw1"), BAD),
        ("module client id with the edge device's username", "gw1/mod1", username_for("gw1"),
         sas_token(m.primary, "gw1", "mod1"), NOT_AUTH),
        ("module token of another module", "gw1/mod1", username_for("gw1", "mod1"),
         sas_token(m.primary, "gw1", "mod2"), BAD),
        ("oversized password (65535 bytes, the MQTT maximum)", "devA", a.username,
         f"SharedAccessSignature sr={sr_a}&sig={'A' * 65000}&se={now + 3600}".ljust(65535, "A"), BAD),
    ]


def test_malformed_and_forged_credentials_are_refused_with_the_right_code_counted_and_logged(
    upstream, hub_factory, clients
):
    a, b, m = Identity.child("devA"), Identity.child("devB"), Identity.module("mod1")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [a, b, m])
    wait_scope(hub, 3)
    # devA is connected for real: no refused CONNECT below (most use client id devA) may take it over
    rc, keeper = try_connect(hub.port, clients, **a.credentials())
    assert rc == V3_ACCEPTED
    before = refused(hub)
    offset = log_size(hub)

    cases = bad_credential_cases(a, b, m)
    wrong = []
    for what, cid, user, pw, ok in cases:
        rc = raw_connect(hub.port, clients, cid, user, pw)
        if rc not in ok:
            wrong.append(f"{what}: CONNACK {'none (connection closed)' if rc is None else rc}, expected {sorted(ok)}")
        assert hub.alive(), f"the hub died on: {what}"
    # v5 reason codes
    v5 = [
        ("v5 expired token", "devA", a.username, sas_token(a.primary, "devA", expiry=int(time.time()) - 3600),
         V5_BAD_CREDENTIALS),
        ("v5 forged sig", "devA", a.username, sas_token(new_key(), "devA"), V5_BAD_CREDENTIALS),
        ("v5 device not in scope", "devZ", Identity.child("devZ").username, Identity.child("devZ").token(),
         V5_NOT_AUTHORIZED),
        ("v5 client id differs from the username", "devA", b.username, b.token(), V5_NOT_AUTHORIZED),
    ]
    for what, cid, user, pw, want in v5:
        rc = raw_connect(hub.port, clients, cid, user, pw, level=5)
        if rc != want:
            wrong.append(f"{what}: CONNACK {'none (connection closed)' if rc is None else hex(rc)}, expected {want:#x}")
    # A password that is not UTF-8: MQTT allows binary passwords, the hub's
    # codec may not; either a CONNACK 4 or a closed connection, the hub stays up.
    rc = raw_connect(hub.port, clients, "devA", a.username, bytes(range(256)) * 4)
    extra = 1 if rc == V3_BAD_CREDENTIALS else 0
    if rc not in (V3_BAD_CREDENTIALS, None):
        wrong.append(f"non-UTF-8 password: CONNACK {rc}, expected 4 or a closed connection")
    assert hub.alive(), "the hub died on a non-UTF-8 password"
    assert not wrong, "wrong refusals:\n  " + "\n  ".join(wrong)

    n = len(cases) + len(v5) + extra
    after = hub.wait_metric("edgehub_auth_refused_total", lambda v: v >= before + n, 10, f"counts {n} refusals")
    assert after == before + n, f"edgehub_auth_refused_total went {before} -> {after}, expected +{n}"
    lines = refusal_lines(log_since(hub, offset))
    assert len(lines) >= n, (
        f"{n} refusals but only {len(lines)} log lines about refusals:\n" + log_since(hub, offset)[-6000:]
    )

    assert not keeper.closed.is_set(), "a refused CONNECT with client id devA closed devA's authenticated connection"
    assert keeper.publish_result("devices/devA/messages/events/", b"still here") == 0

    # the hub is fine and still lets the right device in
    assert raw_connect(hub.port, clients, "devA", a.username, a.token()) == V3_ACCEPTED
    assert raw_connect(hub.port, clients, "devB", b.username, b.token(secondary=True), level=5) == 0
    assert raw_connect(hub.port, clients, "gw1/mod1", m.username, m.token()) == V3_ACCEPTED
    assert hub.alive()
    print(f"refusals counted: {before} -> {after} for {n} bad CONNECTs")


SCOPE_REJECTED = r"scope.*(reject|invalid|error|ignor|fail|malformed|parse)|(reject|invalid|error|ignor|fail|malformed|parse).*scope"


def test_a_corrupt_truncated_misshapen_or_non_json_scope_is_rejected_and_the_previous_scope_stays(
    upstream, hub_factory, clients
):
    a, b = Identity.child("devA"), Identity.child("devB")
    newbie, newbie2 = Identity.child("newbie"), Identity.child("newbie2")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [a, b])
    wait_scope(hub, 2)

    v2 = scope_doc([a, newbie, newbie2])  # would drop devB and add two devices
    bad_docs = {
        "truncated": v2[: len(v2) // 2],
        "corrupt (broken JSON)": v2.replace(b'": "', b'" "', 3),
        "corrupt (invalid UTF-8 inside)": v2.replace(b"newbie2", b"new\xff\xfebie2"),
        "wrong shape (identities not a list)": json.dumps({"version": 1, "identities": "newbie"}).encode(),
        "wrong shape (a list at top level)": json.dumps([newbie.doc()]).encode(),
        "wrong shape (no identities)": json.dumps({"version": 1, "devices": [newbie.doc()]}).encode(),
        "non-JSON (binary)": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
        "non-JSON (text)": b"identities: newbie, newbie2",
    }
    for name, payload in bad_docs.items():
        offset = log_size(hub)
        publish_scope(upstream, payload)
        wait_log(hub, offset, SCOPE_REJECTED, 15, f"a log line rejecting the {name} scope document")
        assert hub.alive(), f"the hub died on the {name} scope document"
        assert hub.metric("edgehub_scope_identities") == 2, f"identities changed after the {name} document"
        rc_b = raw_connect(hub.port, clients, "devB", b.username, b.token())
        rc_n = raw_connect(hub.port, clients, "newbie", newbie.username, newbie.token())
        assert (rc_b, rc_n) == (V3_ACCEPTED, V3_NOT_AUTHORIZED), (
            f"after the {name} document: devB (previous scope) CONNACK {rc_b}, expected 0; "
            f"newbie (only in the bad document) CONNACK {rc_n}, expected 5"
        )

    # a good document after all that applies normally
    publish_scope(upstream, v2)
    wait_scope(hub, 3)
    assert raw_connect(hub.port, clients, "newbie", newbie.username, newbie.token()) == V3_ACCEPTED
    assert raw_connect(hub.port, clients, "devB", b.username, b.token()) == V3_NOT_AUTHORIZED

    # and what was cached is the good one: restart with the upstream down
    upstream.stop()
    hub.terminate()
    hub.start()
    wait_scope(hub, 3, timeout=15)
    assert raw_connect(hub.port, clients, "newbie2", newbie2.username, newbie2.token()) == V3_ACCEPTED
    assert raw_connect(hub.port, clients, "devB", b.username, b.token()) == V3_NOT_AUTHORIZED


def test_many_bad_connects_in_a_row_leave_the_hub_serving(upstream, hub_factory, clients):
    """A burst of refused CONNECTs (v3.1.1 and v5, plain garbage passwords and
    oversized ones) must not take the hub down or lock out a good device."""
    a = Identity.child("devA")
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    publish_scope(upstream, [a])
    wait_scope(hub, 1)
    before = refused(hub)
    n = 0
    for i in range(60):
        level = 5 if i % 2 else 4
        pw = ("x" * 65535) if i % 3 == 0 else sas_token(new_key(), "devA")
        rc = raw_connect(hub.port, clients, "devA", a.username, pw, level=level)
        assert rc == (V5_BAD_CREDENTIALS if level == 5 else V3_BAD_CREDENTIALS), f"attempt {i}: CONNACK {rc}"
        n += 1
        clients.pop().close()
    hub.wait_metric("edgehub_auth_refused_total", lambda v: v >= before + n, 10, f"counts {n} refusals")
    rc, c = try_connect(hub.port, clients, **a.credentials())
    assert rc == V3_ACCEPTED
    assert c.publish_result("devices/devA/messages/events/", b"still fine") == 0
    assert hub.alive()


def test_hub_names_restrict_usernames_and_tokens_and_without_the_flag_any_hub_name_is_accepted(
    upstream_factory, hub_factory, clients
):
    a = Identity.child("devA")
    names = ["myhub.azure-devices.net", "second.azure-devices.net"]
    up1, up2 = upstream_factory(), upstream_factory()
    up1.start()
    up2.start()
    strict = hub_factory(up1, edge_id=EDGE_ID, extra_args=auth_args(hub_names=names))
    anyhub = hub_factory(up2, edge_id=EDGE_ID, extra_args=auth_args(hub_names=()))
    publish_scope(up1, [a])
    publish_scope(up2, [a])
    wait_scope(strict, 1)
    wait_scope(anyhub, 1)

    def attempt(hub, name):
        return raw_connect(hub.port, clients, "devA", username_for("devA", hub=name),
                           sas_token(a.primary, "devA", hub=name))

    for name in names:
        assert attempt(strict, name) == V3_ACCEPTED, f"--hub-name {name}: refused"
    rc = attempt(strict, "third.azure-devices.net")
    assert rc in EITHER, f"a hub name not in --hub-name: CONNACK {rc}, expected a refusal (4 or 5)"
    for name in names + ["third.azure-devices.net", "anything.example.org"]:
        assert attempt(anyhub, name) == V3_ACCEPTED, f"no --hub-name, hub {name}: refused"
    # even with any hub name accepted, the username's and the token's hub must agree
    rc = raw_connect(anyhub.port, clients, "devA", username_for("devA", hub="one.example.org"),
                     sas_token(a.primary, "devA", hub="other.example.org"))
    assert rc in EITHER, f"username and sr naming different hubs: CONNACK {rc}, expected a refusal"


def test_a_large_scope_of_3000_identities_applies_and_any_of_them_authenticates(upstream, hub_factory, clients):
    """A gateway with thousands of leaf devices: the scope document is
    several hundred KiB; it must sync whole and apply in reasonable time."""
    ids = [Identity.child(f"leaf{i:05d}") for i in range(3000)]
    doc = scope_doc(ids)
    hub = hub_factory(upstream, edge_id=EDGE_ID, extra_args=auth_args())
    t0 = time.monotonic()
    publish_scope(upstream, doc)
    wait_scope(hub, len(ids), timeout=30)
    took = time.monotonic() - t0
    for ident in (ids[0], ids[1499], ids[-1]):
        assert raw_connect(hub.port, clients, ident.client_id, ident.username, ident.token()) == V3_ACCEPTED
    ghost = Identity.child("leaf99999")
    assert raw_connect(hub.port, clients, ghost.client_id, ghost.username, ghost.token()) == V3_NOT_AUTHORIZED
    print(f"scope of {len(ids)} identities ({len(doc)} bytes) applied in {took:.2f}s")
