"""The master key that encrypts the cached scope: made by the hub on first
start (<storage>.key, mode 0600) unless --master-key-file / env
EDGEHUB_MASTER_KEY_FILE names one; a missing configured file or a key that
does not decrypt the cache stops the hub (never a silent reset); with the
right key the cached scope authenticates devices offline; the cache holds no
key in plain text."""

from __future__ import annotations

import stat
from pathlib import Path

from authkit import (
    EDGE_ID,
    V3_ACCEPTED,
    V3_BAD_CREDENTIALS,
    V3_NOT_AUTHORIZED,
    Identity,
    auth_args,
    log_since,
    new_key,
    publish_scope,
    raw_connect,
    sas_token,
    secret_needles,
    storage_files_containing,
    wait_scope,
)
from helpers import port_accepts, wait_until


def default_key_file(hub) -> Path:
    return hub.storage.parent / f"{hub.storage.name}.key"


def start_expecting_failure(hub, timeout: float = 30.0) -> tuple[int, str]:
    hub.start(wait_ready=False)
    try:
        rc = hub.proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001
        listening = port_accepts(hub.port)
        hub.close()
        raise AssertionError(
            f"the hub kept running ({'listening' if listening else 'not listening'}) for {timeout}s "
            f"instead of refusing to start:\n{log_since(hub, 0)[-4000:]}"
        ) from None
    return rc, log_since(hub, 0)


def test_the_scope_cache_is_encrypted_a_wrong_or_missing_master_key_stops_the_hub_and_the_right_one_works_offline(
    upstream_factory, hub_factory, tmp_path, clients
):
    up = upstream_factory()
    up.start()
    child1, mod1 = Identity.child("child1"), Identity.module("mod1")
    hub = hub_factory(up, edge_id=EDGE_ID, extra_args=auth_args())
    key_file = default_key_file(hub)
    wait_until(key_file.exists, 10, f"the hub to create its master key {key_file}")
    mode = stat.S_IMODE(key_file.stat().st_mode)
    assert mode == 0o600, f"{key_file} has mode {mode:o}, expected 600"

    publish_scope(up, [child1, mod1])
    wait_scope(hub, 2)
    assert raw_connect(hub.port, clients, "child1", child1.username, child1.token()) == V3_ACCEPTED

    # no key of the scope in plain text under the storage folder (running, then stopped)
    needles = secret_needles([child1, mod1])
    hits = storage_files_containing(hub.storage, needles)
    assert not hits, f"scope keys in plain text in the storage folder while running: {hits[:4]}"
    hub.terminate()
    up.stop()
    hits = storage_files_containing(hub.storage, needles)
    assert not hits, f"scope keys in plain text in the storage folder: {hits[:4]}"
    files = [p for p in hub.storage.rglob("*") if p.is_file()]
    assert files, "the storage folder is empty: where is the scope cached?"

    # another valid master key: the one a fresh hub makes for itself
    maker = hub_factory(None, name="keymaker", edge_id=EDGE_ID, extra_args=auth_args())
    other_key = default_key_file(maker)
    wait_until(other_key.exists, 10, f"a second hub to create {other_key}")
    maker.terminate()
    assert other_key.read_bytes() != key_file.read_bytes()

    wrong = hub_factory(up, name="wrongkey", start=False, storage=hub.storage, edge_id=EDGE_ID,
                        extra_args=auth_args(master_key_file=other_key))
    rc, log = start_expecting_failure(wrong)
    assert rc != 0, f"the hub started with a master key that does not decrypt the cache:\n{log[-3000:]}"
    assert "key" in log.lower(), f"exit {rc} without a message about the key:\n{log[-3000:]}"

    garbage = tmp_path / "garbage.key"
    garbage.write_text("this is not a master key\n")
    garbage.chmod(0o600)
    junk = hub_factory(up, name="garbagekey", start=False, storage=hub.storage, edge_id=EDGE_ID,
                       extra_args=auth_args(master_key_file=garbage))
    rc, log = start_expecting_failure(junk)
    assert rc != 0, f"the hub started with a master key file holding no key:\n{log[-3000:]}"
    assert "key" in log.lower(), f"exit {rc} without a message about the key:\n{log[-3000:]}"

    missing = tmp_path / "no-such-master.key"
    absent = hub_factory(up, name="missingkey", start=False, storage=hub.storage, edge_id=EDGE_ID,
                         extra_args=auth_args(), env={"EDGEHUB_MASTER_KEY_FILE": str(missing)})
    rc, log = start_expecting_failure(absent)
    assert rc != 0, f"the hub started with a configured master key file that does not exist:\n{log[-3000:]}"
    assert "key" in log.lower(), f"exit {rc} without a message about the key:\n{log[-3000:]}"
    assert not missing.exists(), "the hub created the configured master key file instead of refusing to start"

    # the default key file disappears while a cache exists: not a silent reset either
    moved = tmp_path / "moved-away.key"
    key_file.rename(moved)
    try:
        gone = hub_factory(up, name="defaultgone", start=False, storage=hub.storage, edge_id=EDGE_ID,
                           extra_args=auth_args())
        rc, log = start_expecting_failure(gone)
        assert rc != 0, f"the hub started although its default master key vanished while a cache exists:\n{log[-3000:]}"
        assert "key" in log.lower(), f"exit {rc} without a message about the key:\n{log[-3000:]}"
    finally:
        if key_file.exists():
            key_file.unlink()  # a new key the hub made for itself must not replace the real one
        moved.rename(key_file)

    # the right key, named explicitly, upstream still down: offline authentication from the cache
    right = hub_factory(up, name="rightkey", storage=hub.storage, edge_id=EDGE_ID,
                        extra_args=auth_args(master_key_file=key_file))
    wait_scope(right, 2, timeout=15)
    assert right.metric("edgehub_upstream_connected") == 0
    assert raw_connect(right.port, clients, "child1", child1.username, child1.token()) == V3_ACCEPTED
    assert raw_connect(right.port, clients, "gw1/mod1", mod1.username, mod1.token(secondary=True)) == V3_ACCEPTED
    rc = raw_connect(right.port, clients, "child1", child1.username, sas_token(new_key(), "child1"))
    assert rc == V3_BAD_CREDENTIALS, f"a forged token offline: CONNACK {rc}, expected 4"
    ghost = Identity.child("ghost")
    assert raw_connect(right.port, clients, "ghost", ghost.username, ghost.token()) == V3_NOT_AUTHORIZED
    right.terminate()

    # and the default key file (no flag) is the same key
    again = hub_factory(up, name="defaultkey", storage=hub.storage, edge_id=EDGE_ID, extra_args=auth_args())
    wait_scope(again, 2, timeout=15)
    assert raw_connect(again.port, clients, "child1", child1.username, child1.token()) == V3_ACCEPTED
