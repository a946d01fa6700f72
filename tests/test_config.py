"""Configuration: check-config, UpstreamProtocol, storageFolder."""

import re
import subprocess

from helpers import Publisher, free_port, hub_env

GOOD_CONFIG = """\
# a complete, valid edgehub configuration
edge_id = "gateway-1"
listen = ["127.0.0.1:18830"]
storage = "/var/lib/edgehub"
metrics = "127.0.0.1:9600"

[upstream]
addresses = ["mqtt://127.0.0.1:1883"]
protocol = "MQTT"

[store]
ttl_secs = 7200
max_queue_bytes = 1073741824

[mqtt]
max_message_bytes = 262144
forward_topics = ["plant/+/alarm"]
"""

# line 3 has a TOML syntax error
BAD_SYNTAX_CONFIG = """\
edge_id = "gateway-1"
listen = ["127.0.0.1:18830"]
storage = = "/var/lib/edgehub"
"""


def run(args, timeout=30, cwd=None, **extra_env):
    return subprocess.run(args, capture_output=True, timeout=timeout, env=hub_env(**extra_env), cwd=cwd)


def test_check_config_accepts_a_valid_file(edgehub_bin, tmp_path):
    f = tmp_path / "good.toml"
    f.write_text(GOOD_CONFIG)
    r = run([edgehub_bin, "check-config", str(f)])
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:{r.stdout.decode()}\nstderr:{r.stderr.decode()}"


def test_check_config_rejects_a_syntax_error_naming_its_line(edgehub_bin, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(BAD_SYNTAX_CONFIG)
    r = run([edgehub_bin, "check-config", str(f)])
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode != 0, f"check-config accepted a file with a syntax error:\n{out}"
    assert re.search(r"line 3\b", out), f"error message does not say `line 3`:\n{out}"


def test_check_config_rejects_a_missing_file(edgehub_bin, tmp_path):
    r = run([edgehub_bin, "check-config", str(tmp_path / "nope.toml")])
    assert r.returncode != 0


def test_upstream_protocol_amqp_is_refused_at_start(edgehub_bin, tmp_path):
    args = [edgehub_bin, "run", "--listen", f"127.0.0.1:{free_port()}", "--storage", str(tmp_path / "s")]
    try:
        r = run(args, timeout=20, cwd=tmp_path, UpstreamProtocol="AMQP")
    except subprocess.TimeoutExpired:
        raise AssertionError("edgehub kept running with UpstreamProtocol=AMQP") from None
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode != 0, f"edgehub run exited 0 with UpstreamProtocol=AMQP:\n{out}"
    assert "UpstreamProtocol" in out, f"error does not mention UpstreamProtocol:\n{out}"


def test_upstream_protocol_mqtt_is_accepted(hub_factory):
    hub = hub_factory(None, env={"UpstreamProtocol": "MQTT"})
    assert hub.alive()


def test_storage_folder_environment_variable_sets_where_messages_are_stored(hub_factory, tmp_path, clients):
    storage = tmp_path / "from-env" / "store"
    assert not storage.exists()
    hub = hub_factory(None, storage=storage, use_storage_arg=False, env={"storageFolder": str(storage)})
    p = Publisher(hub.port)
    clients.append(p.connect())
    assert p.publish_and_wait("devices/env/messages/events/", b"stored-via-env") < 0x80

    assert storage.is_dir(), "storageFolder directory was not created"
    assert any(storage.rglob("*")), "storageFolder directory is empty"
    hub.wait_queue_depth(1)  # `queue stats --storage <the env folder>`
    # the default location was not used instead
    assert not (tmp_path / "edgehub-data").exists()
