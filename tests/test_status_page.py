"""The status page: `GET /` on the `--metrics` listener, seen in a real
headless browser (Debian's chromium).

The hub's upstream is an address nobody listens on, so the page must show it
not connected and the telemetry the devices send piling up in the queue. The
browser runs with every host but loopback made unreachable (a dead proxy for
everything else, and no name resolution), so the page is also shown to work
on a gateway with no Internet: it needs nothing but the hub.

`/status.json`, which the page draws, is checked on its own with urllib.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from authkit import EDGE_ID, V3_ACCEPTED, Identity, auth_args, publish_scope, scope_doc, try_connect, wait_scope
from helpers import LOOPBACK, Publisher, Subscriber, free_port, wait_until, wait_value
from pluginkit import plugin_hub, plugins_dist  # noqa: F401

TELEMETRY_TOPIC = "devices/d1/messages/events/"
WINDOW = (1280, 900)
# Virtual time the page gets after loading: enough for its first fetch of
# /status.json and the drawing (the refresh after that comes at 5 s).
BUDGET_MS = 3000


# --------------------------------------------------------------------------
# the browser
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed (apt-get install chromium)", pytrace=False)
    return path


def run_chromium(chromium: str, workdir: Path, url: str, *args: str, timeout: float = 60.0) -> str:
    """Loads ``url`` in a fresh headless chromium that can reach loopback
    only; returns its stdout (the DOM with ``--dump-dom``)."""
    profile = workdir / f"chromium-profile-{uuid.uuid4().hex[:8]}"
    cmd = [
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--disable-sync", "--disable-background-networking",
        "--disable-component-update",
        # Offline but for the hub: every host other than loopback goes to a
        # proxy nobody runs (chromium never proxies loopback) and no name
        # resolves, so anything the page fetched from elsewhere would fail.
        f"--proxy-server=http://{LOOPBACK}:9",
        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}",
        f"--virtual-time-budget={BUDGET_MS}",
        *args, url,
    ]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (
        f"chromium exited {r.returncode}\nstderr:\n{r.stderr.decode('utf-8', 'replace')[-4000:]}"
    )
    return r.stdout.decode("utf-8", "replace")


def page_dom(chromium: str, workdir: Path, url: str) -> "Node":
    """The DOM of ``url`` after its script ran, parsed."""
    html = run_chromium(chromium, workdir, url, "--dump-dom")
    assert "<html" in html, f"chromium dumped no document:\n{html[:2000]}"
    return parse_html(html)


def screenshot(chromium: str, workdir: Path, url: str, path: Path) -> bytes:
    """A PNG of ``url`` in a 1280x900 window; returns its bytes."""
    run_chromium(chromium, workdir, url, f"--screenshot={path}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert path.is_file(), f"chromium wrote no screenshot at {path}"
    return path.read_bytes()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG; fails unless ``data`` starts like one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"not a PNG: starts with {data[:8]!r}"
    assert data[12:16] == b"IHDR", "PNG without an IHDR chunk first"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------
# a small DOM, from the HTML chromium dumps
# --------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs, parent: "Node | None"):
        self.tag = tag
        self.attrs = dict(attrs)
        self.parent = parent
        self.children: list = []  # Node or str, in document order

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str) -> list["Node"]:
        return [n for n in self.iter() if n.tag == tag and n is not self]

    def by_id(self, ident: str) -> "Node":
        found = [n for n in self.iter() if n.attrs.get("id") == ident]
        assert found, f"no element with id {ident!r} on the page"
        assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
        return found[0]

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", [], None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse_html(html: str) -> Node:
    b = _TreeBuilder()
    b.feed(html)
    b.close()
    return b.root


def table_rows(table: Node) -> list[list[str]]:
    return [[cell.text().strip() for cell in tr.iter() if cell.tag in ("td", "th")] for tr in table.find_all("tr")]


def polyline_points(svg: Node) -> list[list[tuple[float, float]]]:
    """The points of each series drawn in ``svg``: a polyline, or a dot for
    a series of one point."""
    out = []
    for line in svg.find_all("polyline"):
        pts = []
        for pair in (line.attrs.get("points") or "").split():
            x, y = pair.split(",")
            pts.append((float(x), float(y)))
        out.append(pts)
    for dot in svg.find_all("circle"):
        out.append([(float(dot.attrs["cx"]), float(dot.attrs["cy"]))])
    return out


# --------------------------------------------------------------------------
# the hub
# --------------------------------------------------------------------------


def dead_upstream() -> str:
    """An upstream address on a loopback port nobody listens on."""
    return f"mqtt://{LOOPBACK}:{free_port()}"


def base_url(hub) -> str:
    return f"http://{LOOPBACK}:{hub.metrics_port}"


def get(url: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, dict(r.headers), r.read()


def status_json(hub) -> dict:
    status, headers, body = get(base_url(hub) + "/status.json")
    assert status == 200, f"GET /status.json answered {status}"
    return json.loads(body)


def publish_telemetry(port: int, clients: list, n: int) -> Publisher:
    """Publishes ``n`` QoS 1 telemetry messages as device d1, every one
    acknowledged; the publisher stays connected."""
    pub = Publisher(port, client_id="d1", inflight=100)
    clients.append(pub.connect())
    for i in range(n):
        pub.publish(TELEMETRY_TOPIC, f'{{"seq": {i}, "temperature": 21.5}}'.encode(), qos=1, key=i)
    pub.wait_results(n, 60)
    refused = {k: rc for k, rc in pub.results.items() if rc >= 0x80}
    assert not refused, f"publishes refused: {refused}"
    return pub


def en_us(n: int) -> str:
    """``n`` as the page formats it (toLocaleString en-US)."""
    return f"{n:,}"


def labelled_samples(text: str, name: str) -> dict[tuple, float]:
    """The samples of metric ``name`` in Prometheus text: sorted (label,
    value) pairs -> value (``()`` for a sample without labels)."""
    out: dict[tuple, float] = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})?\s+(\S+)$", line.strip())
        if m:
            labels = tuple(sorted(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(1) or "")))
            out[labels] = float(m.group(2))
    return out


# A latency as the page shows it, and its 99th percentile (an upper bound).
LATENCY = r"[\d,.]+ (µs|ms|s)"
P99 = rf"≤ {LATENCY}|> 10 s"


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_the_status_page_shows_the_edge_its_unreachable_upstream_and_the_queue_it_holds_in_a_browser(
    chromium, hub_factory, clients, tmp_path
):
    n = 1500
    upstream = dead_upstream()
    hub = hub_factory(upstream, edge_id="edge-status-page")
    publish_telemetry(hub.port, clients, n)

    # The history is sampled every 10 s (the first sample when the hub
    # starts): wait for a sample that saw the whole queue, so the charts
    # have something to draw.
    wait_until(
        lambda: any(s["depth"] == n for s in status_json(hub)["history"]), 25,
        f"a history sample with the queue at {n}", interval=0.2,
    )
    before = status_json(hub)
    dom = page_dom(chromium, tmp_path, base_url(hub) + "/")
    after = status_json(hub)

    # the header: which hub, and its upstream, not connected
    assert dom.by_id("edge").text() == "edgehub · edge-status-page"
    assert dom.find_all("title")[0].text() == "edgehub edge-status-page"
    assert dom.by_id("upstate").text() == "upstream not connected: storing"
    assert "down" in dom.by_id("updot").classes() and "up" not in dom.by_id("updot").classes()
    assert dom.by_id("upaddr").text() == upstream
    assert dom.by_id("version").text().startswith(f"v{after['version']}, up ")
    assert dom.by_id("error").attrs.get("style", "").replace(" ", "") in ("", "display:none;"), \
        "the page says the hub is not answering"

    # the tiles: the queue holds every message, one client is connected
    for tile in ("queue-depth", "oldest", "bytes", "clients", "dead-letters", "scope", "c2d", "inputs"):
        assert dom.by_id(f"tile-{tile}").text().strip(), f"tile {tile} is empty"
    assert dom.by_id("tile-queue-depth").text() == en_us(n)
    assert dom.by_id("tile-bytes").text() == en_us(after["now"]["queueBytes"])
    assert after["now"]["queueBytes"] > 0
    assert dom.by_id("tile-clients").text() == "1"
    assert dom.by_id("tile-dead-letters").text() == "0"
    assert re.fullmatch(r"[\d,.]+ (s|min)", dom.by_id("tile-oldest").text()), dom.by_id("tile-oldest").text()
    assert dom.by_id("tile-scope-age").text() == "no scope yet"

    # the sessions: the publisher d1, connected; no route table
    assert dom.by_id("sessions-count").text() == "1 connected, 0 away"
    sessions = table_rows(dom.by_id("sessions"))
    assert sessions[0] == ["client id", "state", "since", "subscriptions", "held"], sessions
    assert [r[:2] for r in sessions[1:]] == [["d1", "connected"]], sessions
    assert re.fullmatch(r"[\d,.]+ (s|min)", sessions[1][2]) and sessions[1][3:] == ["0", "0"], sessions
    assert len([tr for tr in dom.by_id("sessions").find_all("tr") if "session" in tr.classes()]) == 1
    assert table_rows(dom.by_id("routes")) == [["no routes: every upstream-bound message goes upstream"]]

    # the counters since start: n received, none forwarded
    counters = {row[0]: row[1] for row in table_rows(dom.by_id("counters")) if len(row) == 2}
    assert counters.get("received from devices") == en_us(n), counters
    assert counters.get("forwarded upstream") == "0", counters
    assert counters.get("dropped") == "0", counters

    # the charts: one point per history sample; the newest sample saw the
    # largest queue, so the depth line ends at its top
    depth_lines = polyline_points(dom.by_id("depth"))
    assert len(depth_lines) == 1, f"the depth chart has {len(depth_lines)} lines"
    points = depth_lines[0]
    assert len(before["history"]) <= len(points) <= len(after["history"]), (
        f"{len(points)} points for {len(before['history'])}..{len(after['history'])} samples"
    )
    axis_y = 160 - 16  # the x axis of the 600x160 viewBox
    assert points[-1][1] == min(y for _, y in points) < axis_y / 2, f"the newest depth is not the highest: {points}"
    assert "no samples yet" not in dom.by_id("depth").text()
    assert polyline_points(dom.by_id("age")), "the oldest-age chart draws no line"

    # and a picture of it
    png = screenshot(chromium, tmp_path, base_url(hub) + "/", tmp_path / "status-page.png")
    assert len(png) > 10_000, f"a {len(png)}-byte screenshot is too small to show the page"
    assert png_size(png) == WINDOW


def test_status_json_reports_the_hub_and_its_queue_and_the_page_needs_nothing_but_the_hub(
    hub_factory, clients
):
    n = 250
    upstream = dead_upstream()
    hub = hub_factory(upstream, edge_id="edge-status-json")
    publish_telemetry(hub.port, clients, n)
    wait_until(lambda: status_json(hub)["now"]["queueDepth"] == n, 10, f"queueDepth == {n}", interval=0.05)
    wait_until(lambda: status_json(hub)["history"], 10, "the first history sample", interval=0.05)

    status, headers, body = get(base_url(hub) + "/status.json")
    assert status == 200
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert headers.get("Cache-Control") == "no-store", headers
    s = json.loads(body)
    assert set(s) == {"edgeId", "version", "time", "uptimeSeconds", "upstream", "now", "plugins", "routes",
                      "sessions", "sampleEverySeconds", "history"}, sorted(s)
    assert s["edgeId"] == "edge-status-json"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", s["version"]), s["version"]
    assert abs(s["time"] - time.time() * 1000) < 60_000, "time is not the wall clock in Unix ms"
    assert 0 <= s["uptimeSeconds"] < 120
    assert s["upstream"] == {"addresses": [upstream]}
    assert s["sampleEverySeconds"] == 10
    assert s["plugins"] == {}, s["plugins"]  # no plugin files
    assert s["routes"] == [], s["routes"]  # no route table

    # the sessions: the publisher, connected, holding nothing
    sessions = s["sessions"]
    assert set(sessions) == {"connected", "away", "sessions"}, sessions
    assert sessions["connected"] == 1 and sessions["away"] == 0, sessions
    assert len(sessions["sessions"]) == 1, sessions
    d1 = sessions["sessions"][0]
    assert set(d1) == {"clientId", "connected", "sinceMs", "persistent", "subscriptions", "queued"}, d1
    assert d1["clientId"] == "d1" and d1["connected"] is True, d1
    assert d1["persistent"] is False and d1["subscriptions"] == 0 and d1["queued"] == 0, d1
    assert 0 <= s["time"] - d1["sinceMs"] < 120_000, f"sinceMs {d1['sinceMs']} is not when d1 connected"

    now = s["now"]
    expected_now = {
        "clients", "queueDepth", "queueBytes", "queueOldestAgeSeconds", "deadLetters", "upstreamConnected",
        "upstreamAddress", "upstreamReconnects", "scopeIdentities", "scopeVersion", "scopeSyncedMs", "received",
        "forwarded", "expired", "dropped", "refused", "authRefused", "authzRefused", "connectionsRefused",
        "pluginCalls", "filtered", "plugins", "routes", "c2dQueued", "moduleInputsQueued",
    }
    assert set(now) == expected_now, f"missing {expected_now - set(now)}, extra {set(now) - expected_now}"
    assert now["queueDepth"] == n
    assert now["received"] == n
    assert now["forwarded"] == 0
    assert now["upstreamConnected"] is False
    assert now["upstreamAddress"] is None
    assert now["scopeVersion"] == 0 and now["scopeSyncedMs"] is None
    assert now["clients"] == 1
    assert now["queueBytes"] > 0
    assert now["queueOldestAgeSeconds"] >= 0
    assert now["deadLetters"] == 0 and now["dropped"] == 0 and now["expired"] == 0
    assert now["plugins"] == {} and now["routes"] == [], (now["plugins"], now["routes"])
    # the same numbers as /metrics
    m = hub.metrics()
    assert m["edgehub_messages_received_total"] == now["received"]
    assert m["edgehub_queue_depth"] == now["queueDepth"]
    assert m["edgehub_queue_bytes"] == now["queueBytes"]
    assert m["edgehub_scope_version"] == 0 and m["edgehub_scope_synced_timestamp_seconds"] == 0

    history = s["history"]
    assert 1 <= len(history) <= 360
    for sample in history:
        assert set(sample) == {"t", "depth", "oldestAgeSeconds", "connected", "received", "forwarded"}, sample
        assert sample["connected"] is False and sample["forwarded"] == 0, sample
        assert 0 <= sample["depth"] <= n and 0 <= sample["received"] <= n, sample
        assert sample["t"] <= s["time"], sample
    ts = [sample["t"] for sample in history]
    assert ts == sorted(ts), "history is not oldest first"

    # The page is one self-contained file: no script, style, font or image
    # from elsewhere, only its relative /status.json.
    status, headers, page = get(base_url(hub) + "/")
    assert status == 200
    assert headers.get("Content-Type", "").startswith("text/html"), headers
    html = page.decode("utf-8")
    assert "<script>" in html and "<style>" in html, "the script and style are not inline"
    assert not re.findall(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), \
        f"the page names other hosts: {re.findall(r'.{0,40}(?:https?:|//[a-z0-9.-]+[.][a-z]{2,}).{0,40}', html, re.I)}"
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link\b|@import|url\(", html, re.I), \
        "the page loads a resource"
    assert re.search(r"""fetch\(\s*["']/status\.json""", html), "the page does not fetch /status.json"


def test_the_plugins_table_shows_a_loaded_plugin_and_why_a_refused_one_was_refused(
    chromium, plugin_hub, plugins_dist, tmp_path  # noqa: F811
):
    ph = plugin_hub(
        dead_upstream(),
        edge_id="edge-status-plugins",
        plugins={"field-filter": plugins_dist / "field-filter.wasm",
                 "wrong-world": plugins_dist / "wrong-world.wasm"},
    )
    hub = ph.hub

    def plugins_settled():
        p = status_json(hub)["plugins"] or {}
        return p if p.get("field-filter", {}).get("version") and p.get("wrong-world", {}).get("error") else None

    plugins = wait_until(plugins_settled, 60, "field-filter loaded and wrong-world refused", interval=0.1)
    # the numbers of the loaded plugin only: nothing handed to it yet
    now_plugins = status_json(hub)["now"]["plugins"]
    assert set(now_plugins) == {"field-filter"}, now_plugins
    assert now_plugins["field-filter"]["failures"] == 0, now_plugins
    assert now_plugins["field-filter"]["took"]["count"] == 0, now_plugins
    dom = page_dom(chromium, tmp_path, base_url(hub) + "/")
    rows = table_rows(dom.by_id("plugins"))
    assert rows[0] == ["plugin", "kind", "version", "messages", "time, mean", "p99", "failed calls",
                       "last refusal"], rows
    by_name = {r[0]: r for r in rows[1:]}
    assert set(by_name) == {"field-filter", "wrong-world"}, rows
    ff = plugins["field-filter"]
    # no message sent: nothing handed to it, no time to show
    assert by_name["field-filter"] == ["field-filter", ff["kind"], ff["version"], "0", "–", "–", "0", ""], rows
    ww = by_name["wrong-world"]
    assert ww[1:7] == ["–", "–", "0", "–", "–", "0"], rows
    assert ww[7] == plugins["wrong-world"]["error"] and "exports none of the worlds" in ww[7], rows


HOT_ROUTE = "FROM /messages/devices/* WHERE $connectionDeviceId = 'sensor1' INTO plugin(\"field-filter\") THEN $upstream"
METER_ROUTE = "FROM /messages/devices/meter1 INTO $upstream"


def test_the_status_page_shows_what_each_route_carried_how_long_its_plugin_took_the_synced_scope_and_the_sessions(
    chromium, upstream, collector_factory, plugin_hub, plugins_dist, clients, tmp_path  # noqa: F811
):
    sensor, meter, parked = Identity.child("sensor1"), Identity.child("meter1"), Identity.child("parked1")
    collector = collector_factory(upstream)
    ph = plugin_hub(
        upstream,
        edge_id=EDGE_ID,
        extra_args=auth_args(),
        plugins={"field-filter": plugins_dist / "field-filter.wasm"},
        settings={"field-filter": {"config": {"field": "temperature", "above": 25}}},
        # named so that the table order (priority, then name) is not the
        # order of the names
        routes={
            "a-meters": {"route": METER_ROUTE, "priority": 2},
            "hot": {"route": HOT_ROUTE, "onError": "drop"},
        },
    )
    hub = ph.hub

    # the cloud's device scope, retained upstream
    scope_version = 7
    publish_scope(upstream, scope_doc([sensor, meter, parked], version=scope_version))
    wait_scope(hub, 3)
    wait_until(lambda: (status_json(hub)["plugins"].get("field-filter") or {}).get("version"), 60,
               "field-filter loaded", interval=0.1)

    # a persistent session with one subscription that goes away
    away = Subscriber(hub.port, client_id=parked.client_id, clean=False)
    away.client.username_pw_set(parked.username, parked.token())
    clients.append(away.connect())
    away.subscribe(f"devices/{parked.device_id}/messages/devicebound/#", qos=1)
    away.close()
    wait_until(lambda: status_json(hub)["sessions"]["away"] == 1, 10, "parked1's session away", interval=0.05)

    # two devices that stay connected and send
    devices = {}
    for ident in (sensor, meter):
        rc, c = try_connect(hub.port, clients, **ident.credentials())
        assert rc == V3_ACCEPTED, f"{ident.device_id} with its key: CONNACK {rc}"
        devices[ident.device_id] = c
    temperatures = [20, 30.5, 26, 10, 40, 25]  # above 25: 30.5, 26 and 40 pass field-filter
    hot = [json.dumps({"temperature": t, "seq": i}).encode() for i, t in enumerate(temperatures)]
    readings = [json.dumps({"kwh": i}).encode() for i in range(4)]
    k, j = len(hot), len(readings)
    for payload in hot:
        assert devices["sensor1"].publish_result("devices/sensor1/messages/events/", payload) == 0
    for payload in readings:
        assert devices["meter1"].publish_result("devices/meter1/messages/events/", payload) == 0
    passed = [p for p, t in zip(hot, temperatures) if t > 25]
    want_upstream = set(passed + readings)
    got = collector.wait_for(lambda ms: want_upstream <= {p for _, p in ms}, 30, "what the routes let through")
    assert sorted(p for _, p in got) == sorted(want_upstream), f"upstream got {got}"

    def counted():
        s = status_json(hub)
        n = s["now"]
        done = ([r["messages"] for r in n["routes"]] == [k, j] and n["forwarded"] == len(want_upstream)
                and n["plugins"]["field-filter"]["took"]["count"] == k and n["upstreamConnected"])
        return s if done else None

    s = wait_until(counted, 20, f"the routes counting {k} and {j} messages, all forwarded", interval=0.05)
    now = s["now"]
    summary = json.dumps({key: s[key] for key in ("routes", "sessions", "plugins")} | {"now": now}, indent=1)

    # the routes, in table order, and what each carried
    assert s["routes"] == [
        {"name": "hot", "text": HOT_ROUTE, "priority": 0},
        {"name": "a-meters", "text": METER_ROUTE, "priority": 2},
    ], summary
    hot_n, meters_n = now["routes"]
    assert hot_n["name"] == "hot" and meters_n["name"] == "a-meters", summary
    assert hot_n["messages"] == k and meters_n["messages"] == j, summary
    wait = hot_n["pluginWait"]
    assert wait["count"] == k and wait["meanSeconds"] > 0, summary
    assert wait["p99Seconds"] is None or wait["p99Seconds"] >= wait["meanSeconds"], summary
    assert meters_n["pluginWait"]["count"] == 0, summary

    # the plugin: every message of its route handed to it, none failed
    assert set(now["plugins"]) == {"field-filter"}, summary
    ff = now["plugins"]["field-filter"]
    assert ff["failures"] == 0 and ff["took"]["count"] == k and ff["took"]["meanSeconds"] > 0, summary
    assert ff["took"]["p99Seconds"] is None or ff["took"]["p99Seconds"] >= ff["took"]["meanSeconds"], summary
    assert now["pluginCalls"] == k and now["filtered"] == k - len(passed), summary
    assert now["received"] == k + j, summary

    # the upstream it is connected to, and the scope it synced from there
    assert now["upstreamConnected"] is True and now["upstreamAddress"] == upstream.url, summary
    assert now["scopeIdentities"] == 3 and now["scopeVersion"] == scope_version, summary
    assert now["scopeSyncedMs"] is not None, summary
    assert 0 <= s["time"] - now["scopeSyncedMs"] < 60_000, summary
    assert abs(now["scopeSyncedMs"] - time.time() * 1000) < 60_000, summary

    # the sessions: connected ones first, each group by client id
    ss = s["sessions"]
    assert ss["connected"] == 2 and ss["away"] == 1, summary
    assert [(c["clientId"], c["connected"], c["persistent"]) for c in ss["sessions"]] == [
        ("meter1", True, False), ("sensor1", True, False), ("parked1", False, True),
    ], summary
    assert ss["sessions"][2]["subscriptions"] == 1, summary

    # the same numbers on /metrics
    text = hub.metrics_text()
    assert labelled_samples(text, "edgehub_route_messages_total") == {
        (("route", "hot"),): k, (("route", "a-meters"),): j,
    }, text
    waits = labelled_samples(text, "edgehub_route_plugin_wait_seconds_count")
    assert waits.get((("route", "hot"),)) == k and waits.get((("route", "a-meters"),), 0) == 0, waits
    assert labelled_samples(text, "edgehub_plugin_seconds_count").get((("plugin", "field-filter"),)) == k, text
    assert labelled_samples(text, "edgehub_upstream_address") == {(("address", upstream.url),): 1}, text
    assert labelled_samples(text, "edgehub_scope_version") == {(): scope_version}, text
    synced = labelled_samples(text, "edgehub_scope_synced_timestamp_seconds")
    assert set(synced) == {()} and abs(synced[()] * 1000 - now["scopeSyncedMs"]) < 2, (synced, now["scopeSyncedMs"])

    # and in the browser
    dom = page_dom(chromium, tmp_path, base_url(hub) + "/")
    assert dom.by_id("upstate").text() == "upstream connected"
    assert "up" in dom.by_id("updot").classes() and "down" not in dom.by_id("updot").classes()
    assert dom.by_id("upaddr").text() == f"to {upstream.url}"
    assert dom.by_id("tile-scope").text() == "3"
    assert re.fullmatch(r"[\d,.]+ (s|min) ago", dom.by_id("tile-scope-age").text()), dom.by_id("tile-scope-age").text()

    routes = table_rows(dom.by_id("routes"))
    assert routes[0] == ["route", "statement", "priority", "messages", "plugin wait, mean", "p99"], routes
    assert [r[:4] for r in routes[1:]] == [
        ["hot", HOT_ROUTE, "0", en_us(k)], ["a-meters", METER_ROUTE, "2", en_us(j)],
    ], routes
    assert re.fullmatch(LATENCY, routes[1][4]) and re.fullmatch(P99, routes[1][5]), routes
    assert routes[2][4:] == ["–", "–"], routes

    plugins = table_rows(dom.by_id("plugins"))
    by_name = {r[0]: r for r in plugins[1:]}
    assert set(by_name) == {"field-filter"}, plugins
    row = by_name["field-filter"]
    info = s["plugins"]["field-filter"]
    assert row[:4] == ["field-filter", info["kind"], info["version"], en_us(k)], plugins
    assert re.fullmatch(LATENCY, row[4]) and re.fullmatch(P99, row[5]), plugins
    assert row[6:] == ["0", ""], plugins

    assert dom.by_id("sessions-count").text() == "2 connected, 1 away"
    sessions = table_rows(dom.by_id("sessions"))
    assert sessions[0] == ["client id", "state", "since", "subscriptions", "held"], sessions
    assert [r[:2] for r in sessions[1:]] == [["meter1", "connected"], ["sensor1", "connected"],
                                             ["parked1", "away"]], sessions
    assert sessions[3][3] == "1", sessions
    for r in sessions[1:]:
        assert re.fullmatch(r"[\d,.]+ (s|min)", r[2]), sessions


# Client ids, a route name and a route statement written to break out of the
# page's markup: each would add an element (and most would set the title or
# run a handler) if the page put it in as HTML rather than as text.
HOSTILE_CONNECTED = [
    """<img src=x onerror="document.title='pwned'">""",
    """</td></tr><script>document.title='pwned2'</script>""",
    """"'><svg onload="document.title='pwned3'">""",
    "&lt;b&gt;",  # already escaped: must show as these 10 characters, not as <b>
]
HOSTILE_AWAY = """<iframe srcdoc="<script>parent.document.title='pwned4'</script>"></iframe>"""
# Any TOML key is a route name (the rules check the route text, not its name).
HOSTILE_ROUTE_NAME = """r<img src=x onerror="document.title='pwned-route'">"""
# The statement shows in the table too: a string literal of the route
# language may hold any character but its own quote.
HOSTILE_ROUTE_TEXT = (
    "FROM /messages/* WHERE $connectionDeviceId = "
    """'</code></td><script>document.title="pwned5"</script><img src=x onerror="document.title=`pwned6`">'"""
    " INTO $upstream"
)


def only_text(node: Node) -> bool:
    """Whether ``node`` holds text and no element."""
    return all(isinstance(c, str) for c in node.children)


# Every element the page itself puts in those two tables (tbody: the parser's).
SESSION_TABLE_TAGS = {"tbody", "tr", "th", "td", "span"}
ROUTE_TABLE_TAGS = {"tbody", "tr", "th", "td", "code"}


def test_hostile_client_ids_and_route_names_are_shown_as_text_on_the_status_page_never_as_markup(
    chromium, plugin_hub, clients, tmp_path  # noqa: F811
):
    edge_id = "edge-status-hostile"
    # no --auth, no scope: an open broker, any client id connects without credentials
    ph = plugin_hub(
        dead_upstream(),
        edge_id=edge_id,
        routes={HOSTILE_ROUTE_NAME: {"route": HOSTILE_ROUTE_TEXT, "priority": 3}},
    )
    hub = ph.hub

    # a persistent session with one subscription whose client goes away
    away = Subscriber(hub.port, client_id=HOSTILE_AWAY, clean=False)
    clients.append(away.connect())
    away.subscribe("status/hostile/#", qos=1)
    away.close()
    wait_until(lambda: status_json(hub)["sessions"]["away"] == 1, 10, "the hostile persistent session away",
               interval=0.05)
    # and clients that stay connected
    for cid in HOSTILE_CONNECTED:
        pub = Publisher(hub.port, client_id=cid)
        clients.append(pub.connect())

    all_ids = {*HOSTILE_CONNECTED, HOSTILE_AWAY}
    s = wait_value(
        lambda: status_json(hub), lambda s: {c["clientId"] for c in s["sessions"]["sessions"]} == all_ids
        and (s["sessions"]["connected"], s["sessions"]["away"]) == (len(HOSTILE_CONNECTED), 1),
        10, "every hostile session listed in /status.json", interval=0.05, shown="the last /status.json",
    )

    # /status.json carries the strings unchanged: valid JSON (strict: no raw
    # control characters) that decodes to exactly what was sent
    _, _, body = get(base_url(hub) + "/status.json")
    s = json.loads(body.decode("utf-8"), strict=True)
    ss = s["sessions"]
    by_id = {c["clientId"]: c for c in ss["sessions"]}
    assert set(by_id) == all_ids, ss
    for cid in HOSTILE_CONNECTED:
        assert by_id[cid]["connected"] is True and by_id[cid]["persistent"] is False, by_id[cid]
    assert by_id[HOSTILE_AWAY]["connected"] is False and by_id[HOSTILE_AWAY]["persistent"] is True, by_id
    assert by_id[HOSTILE_AWAY]["subscriptions"] == 1, by_id
    assert s["routes"] == [{"name": HOSTILE_ROUTE_NAME, "text": HOSTILE_ROUTE_TEXT, "priority": 3}], s["routes"]
    assert [r["name"] for r in s["now"]["routes"]] == [HOSTILE_ROUTE_NAME], s["now"]["routes"]

    # The page, after its script drew /status.json. `sessions-count` is set
    # by textContent just before the tables, whatever the ids hold, so a
    # filled one means render() ran.
    counts = f"{len(HOSTILE_CONNECTED)} connected, 1 away"
    dom = wait_value(
        lambda: page_dom(chromium, tmp_path, base_url(hub) + "/"),
        lambda d: d.by_id("sessions-count").text() == counts,
        120, "the page drawing the sessions", interval=0.1, shown="the page's session count",
    )

    # The title is the one render() set: none of the handlers ran.
    titles = dom.find_all("title")
    assert [t.text() for t in titles] == [f"edgehub {edge_id}"], [t.text() for t in titles]

    # Nothing came from the strings: no handler attribute anywhere, only
    # the page's own script, style and chart svgs, no img, iframe or b.
    handlers = [(n.tag, k) for n in dom.iter() for k in n.attrs if k.lower().startswith("on")]
    assert not handlers, f"elements with event handlers on the page: {handlers}"
    assert len(dom.find_all("script")) == 1, "a script element besides the page's own"
    assert len(dom.find_all("style")) == 1, "a style element besides the page's own"
    assert [n.attrs.get("id") for n in dom.find_all("svg")] == ["depth", "age", "rates"], \
        [n.attrs for n in dom.find_all("svg")]
    for tag in ("img", "iframe", "b", "object", "embed"):
        assert not dom.find_all(tag), f"a <{tag}> on the page: {[n.attrs for n in dom.find_all(tag)]}"

    # The sessions table: one row of five cells per session, in the order of
    # /status.json, the id the plain text of its first cell.
    table = dom.by_id("sessions")
    tags = {n.tag for n in table.iter() if n is not table}
    assert tags <= SESSION_TABLE_TAGS, \
        f"elements in the sessions table the page does not make: {tags - SESSION_TABLE_TAGS}"
    rows = table.find_all("tr")
    assert table_rows(table)[0] == ["client id", "state", "since", "subscriptions", "held"], table_rows(table)
    session_rows = rows[1:]
    assert all("session" in tr.classes() for tr in session_rows), [tr.attrs for tr in session_rows]
    cells = [[c for c in tr.children if isinstance(c, Node) and c.tag == "td"] for tr in session_rows]
    assert [len(c) for c in cells] == [5] * len(ss["sessions"]), table_rows(table)
    shown = [c[0].text() for c in cells]
    assert shown == [c["clientId"] for c in ss["sessions"]], f"client ids shown {shown!r}"
    for c in cells:
        assert only_text(c[0]), f"markup in a client id cell: {c[0].children}"
    state = {c[0].text(): c[1].text() for c in cells}
    assert state == {**{cid: "connected" for cid in HOSTILE_CONNECTED}, HOSTILE_AWAY: "away"}, state
    assert "&lt;b&gt;" in shown and "<b>" not in shown, shown  # not decoded once more

    # The routes table: its name and statement as text.
    table = dom.by_id("routes")
    tags = {n.tag for n in table.iter() if n is not table}
    assert tags <= ROUTE_TABLE_TAGS, \
        f"elements in the routes table the page does not make: {tags - ROUTE_TABLE_TAGS}"
    routes = table_rows(table)
    assert routes[0] == ["route", "statement", "priority", "messages", "plugin wait, mean", "p99"], routes
    assert [r[:4] for r in routes[1:]] == [[HOSTILE_ROUTE_NAME, HOSTILE_ROUTE_TEXT, "3", "0"]], routes
    route_row = [tr for tr in table.find_all("tr") if "route" in tr.classes()]
    assert len(route_row) == 1, routes
    name_cell, text_cell = [c for c in route_row[0].children if isinstance(c, Node) and c.tag == "td"][:2]
    assert only_text(name_cell) and name_cell.text() == HOSTILE_ROUTE_NAME, name_cell.children
    codes = [c for c in text_cell.children if isinstance(c, Node)]
    assert [c.tag for c in codes] == ["code"], text_cell.children
    assert only_text(codes[0]) and codes[0].text() == HOSTILE_ROUTE_TEXT, codes[0].children
