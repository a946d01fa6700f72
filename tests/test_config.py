"""Configuration: check-config, UpstreamProtocol, storageFolder, and the layers
(file < environment < flags)."""

import re
import subprocess

from helpers import Publisher, free_port, hub_env, port_accepts, wait_until

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


def test_the_environment_overrides_the_file_and_a_flag_overrides_the_environment(hub_factory, tmp_path):
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "metrics.toml"
    cfg.write_text(f'metrics = "127.0.0.1:{file_port}"\n')
    env = {"EDGEHUB_METRICS": f"127.0.0.1:{env_port}"}

    hub = hub_factory(None, metrics=False, extra_args=["--config", str(cfg)], env=env)
    wait_until(lambda: port_accepts(env_port), 10, "metrics on the port of EDGEHUB_METRICS")
    assert not port_accepts(file_port), "metrics also served on the file's address"
    hub.close()

    hub = hub_factory(None, metrics_port=flag_port, extra_args=["--config", str(cfg)], env=env)
    wait_until(lambda: port_accepts(flag_port), 10, "metrics on the port of --metrics")
    assert not port_accepts(env_port), "metrics also served on the environment's address"


def test_a_bad_value_in_the_environment_stops_the_hub_naming_the_variable(edgehub_bin, tmp_path):
    args = [edgehub_bin, "run", "--listen", f"127.0.0.1:{free_port()}", "--storage", str(tmp_path / "s")]
    for var, value, says in [("EDGEHUB_UPSTREAM_MAX_INFLIGHT", "0", "1..=32768"),
                             ("timeToLiveSecs", "soon", '"soon"')]:
        try:
            r = run(args, timeout=20, cwd=tmp_path, **{var: value})
        except subprocess.TimeoutExpired:
            raise AssertionError(f"edgehub kept running with {var}={value}") from None
        out = (r.stdout + r.stderr).decode("utf-8", "replace")
        assert r.returncode != 0, f"edgehub run exited 0 with {var}={value}:\n{out}"
        assert f"environment variable {var}" in out and says in out, f"error does not name {var}:\n{out}"
