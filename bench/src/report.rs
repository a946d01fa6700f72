//! Printing: run header, per-system progress, the comparison table with
//! ratios, and the RSS profile.

use std::path::Path;
use std::time::Duration;

use crate::idle::IdleRun;
use crate::latency::{self, LatencyRun, LatencySettings};
use crate::load::SubscriberEnd;
use crate::procstat::PerMessage;
use crate::rss::{mib, Status};
use crate::scenario::{RssProfile, Settings, Sut, SystemResult};
use crate::timing::Percentiles;
use crate::wan::LinkSpec;

/// `12345.6` -> `"12,346"`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The run's settings; `throughput` says whether the store-and-forward
/// workload runs, `latency` describes the latency phase if it runs.
pub fn print_header(
    s: &Settings,
    edgehub_bin: &Path,
    throughput: bool,
    latency: Option<&LatencySettings>,
) {
    println!("edgehub store-and-forward benchmark");
    if throughput {
        println!(
        "  workload: {} messages, {} publishers (MQTT 3.1.1, QoS 1, window {} per connection), \
         payload {} B, topic devices/bench{{i}}/messages/events/",
        thousands(s.messages as f64),
        s.publishers,
        s.window,
        s.payload
        );
    }
    if let Some(l) = latency {
        println!(
            "  latency: {} messages at {} msg/s, 1 publisher (QoS 1), payload {} B, upstream connected",
            thousands(l.messages as f64),
            thousands(f64::from(l.rate)),
            l.payload
        );
    }
    println!(
        "  edgehub: {} ({})",
        edgehub_bin.display(),
        if s.edgehub.is_some() {
            "found"
        } else {
            "missing"
        }
    );
    println!(
        "  bridge: mosquitto persistence on, autosave_interval {} s, max_inflight_messages {}, \
         max_queued_messages 0",
        s.bridge.autosave_interval, s.bridge.max_inflight
    );
    println!(
        "  phase deadline {} s, subscriber idle timeout {} s, cores {}",
        s.phase_timeout.as_secs(),
        s.idle_timeout.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    print_load("at start");
    println!();
}

/// The machine's load average: other work on the cores skews every number.
pub fn print_load(when: &str) {
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let fields: Vec<&str> = load.split_whitespace().take(3).collect();
        println!("  load average {when}: {}", fields.join(" "));
    }
}

/// Median of some values; `None` if empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The runs of one system (one table row; several with `--repeat`).
pub struct Runs<'a>(pub &'a [SystemResult]);

impl Runs<'_> {
    fn label(&self) -> &str {
        &self.0[0].label
    }

    /// Ingest rates, `None` unless every run ingested everything.
    fn ingest_rates(&self) -> Option<Vec<f64>> {
        self.0.iter().map(|r| r.ingest.as_ref()?.rate()).collect()
    }

    /// Drain (or receive) rates, `None` unless every run delivered everything.
    fn delivery_rates(&self) -> Option<Vec<f64>> {
        self.0
            .iter()
            .map(|r| {
                let d = r.delivery.as_ref()?;
                (d.end == SubscriberEnd::Complete && d.error.is_none())
                    .then(|| d.rate())
                    .flatten()
            })
            .collect()
    }

    fn ingest_rate(&self) -> Option<f64> {
        median(self.ingest_rates()?)
    }

    fn delivery_rate(&self) -> Option<f64> {
        median(self.delivery_rates()?)
    }

    fn ingest_cell(&self) -> String {
        if let Some(rates) = self.ingest_rates() {
            return spread(rates);
        }
        // Describe the first run that failed.
        for r in self.0 {
            match &r.ingest {
                None => return "-".into(),
                Some(i) if i.rate().is_none() => {
                    let what = if i.errors.iter().any(|e| e.contains("timeout")) {
                        "timeout"
                    } else {
                        "failed"
                    };
                    return format!("{what} ({}/{} acked)", i.acked, i.expected);
                }
                Some(_) => {}
            }
        }
        "-".into()
    }

    fn delivery_cell(&self) -> String {
        if let Some(rates) = self.delivery_rates() {
            return spread(rates);
        }
        for r in self.0 {
            let Some(d) = &r.delivery else {
                return "-".into();
            };
            let rate = d.rate().map_or("-".into(), thousands);
            match (d.end, &d.error) {
                (_, Some(_)) => return format!("{rate} (error)"),
                (SubscriberEnd::Idle, None) => return format!("{rate} (stalled)"),
                (SubscriberEnd::Timeout, None) => return format!("{rate} (timeout)"),
                (SubscriberEnd::Complete, None) => {}
            }
        }
        "-".into()
    }

    /// Worst case over the runs of a subscriber count.
    fn worst(&self, f: impl Fn(&crate::load::SubscriberStats) -> u64) -> String {
        self.0
            .iter()
            .filter_map(|r| r.delivery.as_ref().map(&f))
            .max()
            .map_or("-".into(), |v| v.to_string())
    }

    /// The highest peak RSS over the runs.
    fn peak_rss_kib(&self) -> Option<u64> {
        self.0.iter().filter_map(|r| r.peak_rss_kib).max()
    }

    fn cells(&self) -> Vec<String> {
        let delivered = self
            .0
            .iter()
            .filter_map(|r| r.delivery.as_ref())
            .min_by_key(|d| d.distinct)
            .map_or("-".into(), |d| format!("{}/{}", d.distinct, d.expected));
        let per_msg = |cpu: fn(&SystemResult) -> Option<std::time::Duration>| {
            median(
                self.0
                    .iter()
                    .filter_map(|r| {
                        let n = r.delivery.as_ref()?.expected.max(1) as f64;
                        Some(cpu(r)?.as_secs_f64() * 1e6 / n)
                    })
                    .collect(),
            )
        };
        let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let sut_cpu = format!(
            "{} / {}",
            us(per_msg(|r| r.ingest_cpu)),
            us(per_msg(|r| r.drain_cpu))
        );
        let first = median(
            self.0
                .iter()
                .filter_map(|r| r.first_delivery_after.map(|t| t.as_secs_f64()))
                .collect(),
        );
        vec![
            self.label().to_string(),
            self.ingest_cell(),
            self.delivery_cell(),
            delivered,
            self.worst(|d| d.lost()),
            self.worst(|d| d.duplicates),
            first.map_or("-".into(), |t| format!("{t:.2} s")),
            sut_cpu,
            us(per_msg(|r| r.upstream_cpu)),
            self.peak_rss_kib().map_or("-".into(), mib),
            format!(
                "{} / {}",
                store(self.0.iter().filter_map(|r| r.store_bytes).max()),
                store(self.0.iter().filter_map(|r| r.store_bytes_drained).max())
            ),
        ]
    }
}

/// Bytes as MiB with one decimal, or "-".
fn store(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0))
}

/// `a / b` as `"1.23x"`, or "n/a".
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// One value, or the median with the range over repeated runs.
fn spread(rates: Vec<f64>) -> String {
    let med = median(rates.clone()).unwrap_or(0.0);
    if rates.len() < 2 {
        return thousands(med);
    }
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    format!("{} ({}-{})", thousands(med), thousands(min), thousands(max))
}

/// One line per finished run, as the benchmark goes.
pub fn print_progress(r: &SystemResult) {
    let runs = Runs(std::slice::from_ref(r));
    let per_msg = |cpu: Option<std::time::Duration>| {
        cpu.map_or("-".into(), |c| {
            format!(
                "{:.1}",
                c.as_secs_f64() * 1e6 / r.ingest.as_ref().map_or(1, |i| i.expected.max(1)) as f64
            )
        })
    };
    println!(
        "{}: ingest {} msg/s, drain/receive {} msg/s, lost {}, dups {} \
         (load generator CPU us/msg: ingest {}, drain {}){}",
        r.label,
        runs.ingest_cell(),
        runs.delivery_cell(),
        runs.worst(|d| d.lost()),
        runs.worst(|d| d.duplicates),
        per_msg(r.loadgen_cpu.0),
        per_msg(r.loadgen_cpu.1),
        r.error
            .as_ref()
            .map(|e| format!(" -- stopped: {e}"))
            .unwrap_or_default()
    );
}

/// The comparison table (markdown) and the ratios. `groups` holds the runs
/// of each system.
pub fn print_table(s: &Settings, groups: &[Vec<SystemResult>]) {
    let header = [
        "system",
        "ingest msg/s",
        "drain (c: receive) msg/s",
        "delivered",
        "lost",
        "dups",
        "1st delivery after upstream start",
        "CPU us/msg ingest / drain",
        "upstream CPU us/msg",
        "peak RSS MiB",
        "store on disk MiB full / drained",
    ];
    let groups: Vec<Runs> = groups
        .iter()
        .filter(|g| !g.is_empty())
        .map(|g| Runs(g))
        .collect();
    let rows: Vec<Vec<String>> = groups.iter().map(Runs::cells).collect();

    let repeats = groups.iter().map(|g| g.0.len()).max().unwrap_or(1);
    println!();
    println!(
        "Results ({} messages x {} B, {} publishers{}):",
        thousands(s.messages as f64),
        s.payload,
        s.publishers,
        if repeats > 1 {
            format!("; median (min-max) of {repeats} runs")
        } else {
            String::new()
        }
    );
    println!();
    print_markdown(&header, &rows);

    let find = |label: &str| groups.iter().find(|g| g.label() == label);
    let (edgehub, bridge, ceiling) = (
        find("edgehub"),
        find("mosquitto bridge"),
        find("upstream ceiling (direct)"),
    );
    let plugin_systems = [
        ("filter", find("edgehub + Rust filter")),
        ("pass-through", find("edgehub + Rust pass-through")),
        ("router", find("edgehub + Rust router")),
    ];
    let ingest = |g: Option<&Runs>| g.and_then(Runs::ingest_rate);
    let drain = |g: Option<&Runs>| g.and_then(Runs::delivery_rate);
    println!();
    println!("Ratios{}:", if repeats > 1 { " (of medians)" } else { "" });
    println!(
        "  edgehub / bridge ingest:            {}",
        ratio(ingest(edgehub), ingest(bridge))
    );
    println!(
        "  edgehub / bridge drain:             {}",
        ratio(drain(edgehub), drain(bridge))
    );
    println!(
        "  edgehub drain / upstream ceiling:   {}  (ceiling = subscriber receive rate in (c))",
        ratio(drain(edgehub), drain(ceiling))
    );
    println!(
        "  bridge drain / upstream ceiling:    {}",
        ratio(drain(bridge), drain(ceiling))
    );
    println!(
        "  edgehub ingest / upstream ingest:   {}  (upstream ingest is with its subscriber attached)",
        ratio(ingest(edgehub), ingest(ceiling))
    );

    for (name, g) in plugin_systems {
        if g.is_some() {
            let rss = |g: Option<&Runs>| g.and_then(Runs::peak_rss_kib);
            let extra_rss = match (rss(g), rss(edgehub)) {
                (Some(a), Some(b)) => format!("{:+.1} MiB", (a as f64 - b as f64) / 1024.0),
                _ => "n/a".into(),
            };
            println!(
                "  edgehub + Rust {name} / edgehub:     ingest {}, drain {}, peak RSS {extra_rss}",
                ratio(ingest(g), ingest(edgehub)),
                ratio(drain(g), drain(edgehub))
            );
            println!(
                "  edgehub + Rust {name} / bridge:      ingest {}, drain {}",
                ratio(ingest(g), ingest(bridge)),
                ratio(drain(g), drain(bridge))
            );
        }
    }

    let all: Vec<SystemResult> = groups.iter().flat_map(|g| g.0.iter().cloned()).collect();
    print_notes(&all);
}

/// A markdown table: first column left-aligned, the others right-aligned.
fn print_markdown(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|row| row[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap()
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, &w))| {
                if i == 0 {
                    format!(" {cell:<w$} ")
                } else {
                    format!(" {cell:>w$} ")
                }
            })
            .collect();
        println!("|{}|", padded.join("|"));
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            if i == 0 {
                "-".repeat(w + 2)
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    println!("|{}|", rule.join("|"));
    for row in rows {
        line(row);
    }
}

/// The WAN drain: per link, each system's drain rate over what arrived
/// before the deadline, and edgehub's as a share of what its window allows
/// (`max_inflight` messages per round trip), the upstream takes at all
/// (`ceiling`, measured on loopback) or the link carries (`link`: its
/// bandwidth over one PUBLISH of the workload), whichever is lowest.
pub fn print_wan_table(
    s: &Settings,
    max_inflight: usize,
    ceiling: &SystemResult,
    groups: &[(LinkSpec, Vec<Vec<SystemResult>>)],
) {
    let upstream = Runs(std::slice::from_ref(ceiling)).delivery_rate();
    let header = [
        "link",
        "system",
        "drain msg/s",
        "delivered by the deadline",
        "lost",
        "1st delivery after upstream start",
        "bound msg/s: the lowest of window / RTT, the upstream's ceiling, the link's bandwidth",
        "drain / bound",
        "live messages received",
        "live latency p50 / p99 s",
    ];
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (link, systems) in groups {
        let mut edgehub_rate = None;
        let mut bridge_rate = None;
        for runs in systems.iter().filter(|r| !r.is_empty()) {
            let label = runs[0].label.clone();
            // Mosquitto's max_inflight_messages bounds what it sends its
            // clients, not what its bridge sends the upstream: the bridge
            // has no window to compare with.
            let window = label.starts_with("edgehub").then_some(max_inflight);
            // The drain is cut at the phase deadline on a slow link: the
            // rate is over what arrived, from the first delivery to the last.
            let rate = median(
                runs.iter()
                    .filter_map(|r| {
                        let d = r.delivery.as_ref()?;
                        (d.end != SubscriberEnd::Idle && d.error.is_none())
                            .then(|| d.rate())
                            .flatten()
                    })
                    .collect(),
            )
            .filter(|_| runs.iter().all(|r| r.error.is_none()));
            let by_window = window.map(|w| w as f64 / link.rtt.as_secs_f64().max(1e-3));
            // What the link carries at most: its bandwidth over one PUBLISH
            // (fixed header, topic, packet id, payload) of the workload.
            let by_link = link.bytes_per_sec.map(|b| {
                let topic = "devices/bench0/messages/events/".len();
                b as f64 / (2 + 2 + topic + 2 + s.payload) as f64
            });
            let bound = by_window.map(|w| {
                [(upstream, "ceiling"), (by_link, "link")]
                    .into_iter()
                    .filter_map(|(v, what)| Some((v?, what)))
                    .fold((w, "window"), |a, b| if b.0 < a.0 { b } else { a })
            });
            let delivered = runs
                .iter()
                .filter_map(|r| r.delivery.as_ref())
                .min_by_key(|d| d.distinct)
                .map_or("-".into(), |d| format!("{}/{}", d.distinct, d.expected));
            let lost: u64 = runs
                .iter()
                .filter_map(|r| r.delivery.as_ref())
                .filter(|d| d.end == SubscriberEnd::Complete)
                .map(|d| d.lost())
                .max()
                .unwrap_or(0);
            let first = median(
                runs.iter()
                    .filter_map(|r| r.first_delivery_after.map(|t| t.as_secs_f64()))
                    .collect(),
            );
            for r in runs.iter() {
                if let Some(e) = &r.error {
                    notes.push(format!("{} over {}: {e}", r.label, link.describe()));
                }
            }
            match label.as_str() {
                "edgehub" => edgehub_rate = rate,
                "mosquitto bridge" => bridge_rate = rate,
                _ => {}
            }
            // Live messages published once the system delivers again.
            let live: Vec<(u64, u64, Option<Percentiles>)> = runs
                .iter()
                .filter_map(|r| Some(r.live.as_ref()?.since(r.delivery.as_ref()?.first?)))
                .collect();
            for l in runs.iter().filter_map(|r| r.live.as_ref()) {
                if let Some(e) = &l.error {
                    notes.push(format!("{label} over {}: {e}", link.describe()));
                }
            }
            let live_received = live
                .iter()
                .min_by_key(|(_, received, _)| *received)
                .map_or("-".into(), |(sent, received, _)| {
                    format!("{received}/{sent}")
                });
            let live_latency = |pick: fn(&Percentiles) -> Duration| {
                median(
                    live.iter()
                        .filter_map(|(_, _, p)| p.as_ref().map(|p| pick(p).as_secs_f64()))
                        .collect(),
                )
            };
            let live_latency = match (live_latency(|p| p.p50), live_latency(|p| p.p99)) {
                (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
                _ => "-".into(),
            };
            rows.push(vec![
                link.describe(),
                match (window, s.live) {
                    (Some(w), Some(l)) if label == "edgehub, live share" => format!(
                        "{label} {} % (window {w}{})",
                        l.share,
                        match l.max_bytes_per_sec {
                            0 => String::new(),
                            b => format!(", {} B/s", thousands(b as f64)),
                        }
                    ),
                    (Some(w), _) => format!("{label} (window {w})"),
                    (None, _) => {
                        format!("{label} (max_inflight_messages {})", s.bridge.max_inflight)
                    }
                },
                rate.map_or("-".into(), thousands),
                delivered,
                lost.to_string(),
                first.map_or("-".into(), |t| format!("{t:.2} s")),
                bound.map_or("-".into(), |(b, what)| format!("{} ({what})", thousands(b))),
                match (rate, bound) {
                    (Some(r), Some((b, _))) => format!("{:.2}", r / b),
                    _ => "-".into(),
                },
                live_received,
                live_latency,
            ]);
        }
        notes.push(format!(
            "{}: edgehub / bridge drain {}",
            link.describe(),
            ratio(edgehub_rate, bridge_rate)
        ));
    }
    let repeats = groups
        .iter()
        .flat_map(|(_, g)| g.iter().map(Vec::len))
        .max()
        .unwrap_or(1);
    println!();
    println!(
        "WAN drain ({} messages x {} B queued during the outage, drain cut at {} s{}):",
        thousands(s.messages as f64),
        s.payload,
        s.phase_timeout.as_secs(),
        if repeats > 1 {
            format!("; medians of {repeats} runs")
        } else {
            String::new()
        }
    );
    if let Some(l) = s.live {
        println!(
            "Live messages: one more device publishes {} msg/s (QoS 1) from the upstream's start until the backlog has arrived; those published once the system delivers again are timed from their PUBLISH to the upstream subscriber.",
            l.rate
        );
    }
    println!();
    print_markdown(&header, &rows);
    println!();
    for n in notes {
        println!("  {n}");
    }
}

fn print_notes(results: &[SystemResult]) {
    let mut notes = Vec::new();
    for r in results {
        if let Some(e) = &r.error {
            notes.push(format!("{}: stopped early: {e}", r.label));
        }
        if let Some(i) = &r.ingest {
            for e in &i.errors {
                notes.push(format!("{}: {e}", r.label));
            }
        }
        if let Some(d) = &r.delivery {
            if let Some(e) = &d.error {
                notes.push(format!("{}: subscriber: {e}", r.label));
            }
            if d.unparsed > 0 {
                notes.push(format!(
                    "{}: {} deliveries without a valid sequence number (payload changed?)",
                    r.label, d.unparsed
                ));
            }
        }
        for w in &r.warnings {
            notes.push(format!("{}: WARNING: {w}", r.label));
        }
    }
    if !notes.is_empty() {
        println!();
        println!("Notes:");
        for n in notes {
            println!("  - {n}");
        }
    }
}

pub fn print_rss_profile(s: &Settings, p: &RssProfile) {
    println!();
    println!(
        "edgehub RSS with a {}-message queue (sampled every {} ms):",
        thousands(s.messages as f64),
        s.rss_interval.as_millis()
    );
    print_progress(&p.system);
    if let Some(d) = &p.system.delivery {
        println!(
            "  delivered {}/{}, lost {}, duplicates {}",
            d.distinct,
            d.expected,
            d.lost(),
            d.duplicates
        );
    }
    println!(
        "  store on disk: {} MiB with the full queue, {} MiB {} s after the drain",
        store(p.system.store_bytes),
        store(p.system.store_bytes_drained),
        s.linger.as_secs()
    );
    let profile = |values: &[u64]| values.iter().map(|&k| mib(k)).collect::<Vec<_>>().join(" ");
    for ph in &p.phases {
        println!(
            "  {:<22} RSS min {} MiB, max {} MiB (anon max {} MiB; {} samples); at 0%,10%..100%: {}",
            ph.phase,
            mib(ph.window.min_kib),
            mib(ph.window.max_kib),
            mib(ph.window.max_anon_kib),
            ph.window.samples,
            profile(&ph.profile.iter().map(|st| st.rss_kib).collect::<Vec<_>>())
        );
        println!(
            "  {:<22} of which anon at 0%,10%..100%: {}",
            "",
            profile(&ph.profile.iter().map(|st| st.anon_kib).collect::<Vec<_>>())
        );
    }
    // Idle: the first sample, before any load; settled: the last.
    let first = p.phases.first().and_then(|ph| ph.profile.first());
    let last = p.phases.last().and_then(|ph| ph.profile.last());
    if let (Some(idle), Some(end)) = (first, last) {
        let split = |st: &Status| {
            format!(
                "{} MiB (anon {} + mapped files {})",
                mib(st.rss_kib),
                mib(st.anon_kib),
                mib(st.rss_kib - st.anon_kib.min(st.rss_kib))
            )
        };
        println!(
            "  RSS idle before the load {}; at the end {}: {} MiB above idle ({} MiB of it anon)",
            split(idle),
            split(end),
            mib(end.rss_kib.saturating_sub(idle.rss_kib)),
            mib(end.anon_kib.saturating_sub(idle.anon_kib))
        );
    }
    if let Some(peak) = p.system.peak_rss_kib {
        println!("  peak RSS (VmHWM) over the whole run: {} MiB", mib(peak));
    }
    print_notes(std::slice::from_ref(&p.system));
}

/// One line per finished latency run, as the benchmark goes.
pub fn print_latency_progress(r: &LatencyRun) {
    let p = |f: fn(&Percentiles) -> std::time::Duration| {
        r.percentiles
            .as_ref()
            .map_or("-".into(), |p| format!("{:.3}", f(p).as_secs_f64() * 1e3))
    };
    println!(
        "{} latency: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {}/{} measured, \
         {} of {} sent received, dups {}, publishing at {} msg/s{}{}",
        r.label,
        p(|p| p.p50),
        p(|p| p.p90),
        p(|p| p.p99),
        p(|p| p.max),
        r.measured,
        r.expected_measured,
        r.received,
        r.sent,
        r.duplicates,
        r.publish_rate.map_or("-".into(), thousands),
        r.per_message
            .map(|m| format!(
                "; its CPU {:.1} us and {:.2} wake-ups per message",
                m.cpu_us, m.wakeups
            ))
            .unwrap_or_default(),
        r.error
            .as_ref()
            .map(|e| format!(" -- stopped: {e}"))
            .unwrap_or_default()
    );
}

/// The latency runs of one system (one row of the latency table).
struct LatencyRuns<'a>(&'a [LatencyRun]);

impl LatencyRuns<'_> {
    /// One percentile of every complete run, in milliseconds.
    fn values(&self, f: fn(&Percentiles) -> std::time::Duration) -> Vec<f64> {
        self.0
            .iter()
            .filter_map(|r| r.complete_percentiles())
            .map(|p| f(&p).as_secs_f64() * 1e3)
            .collect()
    }

    fn median(&self, f: fn(&Percentiles) -> std::time::Duration) -> Option<f64> {
        median(self.values(f))
    }

    /// The median over complete runs of what the process used per message.
    fn per_message(&self, f: fn(&PerMessage) -> f64) -> Option<f64> {
        median(
            self.0
                .iter()
                .filter(|r| r.complete_percentiles().is_some())
                .filter_map(|r| r.per_message.as_ref().map(f))
                .collect(),
        )
    }

    fn cell(&self, f: fn(&Percentiles) -> std::time::Duration) -> String {
        let values = self.values(f);
        let ms = |v: f64| format!("{v:.3}");
        match median(values.clone()) {
            None => "-".into(),
            Some(med) if values.len() < 2 => ms(med),
            Some(med) => {
                let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                let max = values.iter().copied().fold(0.0, f64::max);
                format!("{} ({}-{})", ms(med), ms(min), ms(max))
            }
        }
    }

    fn cells(&self) -> Vec<String> {
        let worst = self.0.iter().min_by_key(|r| r.measured);
        vec![
            self.0[0].label.clone(),
            self.cell(|p| p.p50),
            self.cell(|p| p.p90),
            self.cell(|p| p.p99),
            self.cell(|p| p.max),
            worst.map_or("-".into(), |r| {
                format!("{}/{}", r.measured, r.expected_measured)
            }),
            self.0
                .iter()
                .map(|r| r.sent.saturating_sub(r.received))
                .max()
                .map_or("-".into(), |v| v.to_string()),
            self.0
                .iter()
                .map(|r| r.duplicates)
                .max()
                .map_or("-".into(), |v| v.to_string()),
            median(self.0.iter().filter_map(|r| r.publish_rate).collect())
                .map_or("-".into(), thousands),
            self.per_message(|m| m.cpu_us)
                .map_or("-".into(), |v| format!("{v:.1}")),
            self.per_message(|m| m.wakeups)
                .map_or("-".into(), |v| format!("{v:.2}")),
        ]
    }
}

/// The latency table (markdown) and the edgehub / bridge ratios.
pub fn print_latency_table(l: &LatencySettings, groups: &[Vec<LatencyRun>]) {
    let header = [
        "system",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "measured",
        "lost",
        "dups",
        "publish msg/s",
        "CPU us/msg",
        "wake-ups/msg",
    ];
    let groups: Vec<LatencyRuns> = groups
        .iter()
        .filter(|g| !g.is_empty())
        .map(|g| LatencyRuns(g))
        .collect();
    let rows: Vec<Vec<String>> = groups.iter().map(LatencyRuns::cells).collect();
    let repeats = groups.iter().map(|g| g.0.len()).max().unwrap_or(1);
    println!();
    println!(
        "Latency, device PUBLISH to upstream subscriber, upstream connected ({} messages x {} B \
         at {} msg/s, QoS 1, 1 publisher, first {} not measured{}):",
        thousands(l.messages as f64),
        l.payload,
        thousands(f64::from(l.rate)),
        l.warmup,
        if repeats > 1 {
            format!("; median (min-max) of the per-run percentiles of {repeats} runs")
        } else {
            String::new()
        }
    );
    println!();
    print_markdown(&header, &rows);

    let find = |label: &str| groups.iter().find(|g| g.0[0].label == label);
    let (edgehub, bridge, floor) = (
        find("edgehub"),
        find("mosquitto bridge"),
        find(latency::UPSTREAM_LABEL),
    );
    let at = |g: Option<&LatencyRuns>, f: fn(&Percentiles) -> std::time::Duration| {
        g.and_then(|g| g.median(f))
    };
    println!();
    println!(
        "Latency ratios{} (target: edgehub / bridge <= 1.2x):",
        if repeats > 1 { " (of medians)" } else { "" }
    );
    println!(
        "  edgehub / bridge:           p50 {}, p99 {}",
        ratio(at(edgehub, |p| p.p50), at(bridge, |p| p.p50)),
        ratio(at(edgehub, |p| p.p99), at(bridge, |p| p.p99))
    );
    println!(
        "  edgehub / upstream floor:   p50 {}, p99 {}",
        ratio(at(edgehub, |p| p.p50), at(floor, |p| p.p50)),
        ratio(at(edgehub, |p| p.p99), at(floor, |p| p.p99))
    );
    println!(
        "  bridge / upstream floor:    p50 {}, p99 {}",
        ratio(at(bridge, |p| p.p50), at(floor, |p| p.p50)),
        ratio(at(bridge, |p| p.p99), at(floor, |p| p.p99))
    );
    let used =
        |g: Option<&LatencyRuns>, f: fn(&PerMessage) -> f64| g.and_then(|g| g.per_message(f));
    println!(
        "  edgehub / bridge, its own process per message: CPU {}, wake-ups {}",
        ratio(used(edgehub, |m| m.cpu_us), used(bridge, |m| m.cpu_us)),
        ratio(used(edgehub, |m| m.wakeups), used(bridge, |m| m.wakeups))
    );

    let mut notes = Vec::new();
    for r in groups.iter().flat_map(|g| g.0.iter()) {
        if let Some(e) = &r.error {
            notes.push(format!("{} (latency): stopped early: {e}", r.label));
        }
        for w in &r.warnings {
            notes.push(format!("{} (latency): WARNING: {w}", r.label));
        }
    }
    if !notes.is_empty() {
        println!();
        println!("Notes:");
        for n in notes {
            println!("  - {n}");
        }
    }
}

/// One idle run, as it finishes.
pub fn print_idle_progress(r: &IdleRun) {
    match &r.error {
        Some(e) => println!("{} idle: failed: {e}", r.label),
        None => println!(
            "{} idle: CPU {:.1} ms and {} wake-ups in {} s ({} threads)",
            r.label,
            r.cpu.as_secs_f64() * 1000.0,
            r.wakeups,
            r.window.as_secs(),
            r.threads
        ),
    }
}

/// The idle table (markdown; medians over runs, per second of the window)
/// and each system's ratios to the bridge's.
pub fn print_idle_table(groups: &[Vec<IdleRun>]) {
    let per_sec = |runs: &[IdleRun], f: fn(&IdleRun) -> f64| {
        median(
            runs.iter()
                .filter(|r| r.error.is_none())
                .map(|r| f(r) / r.window.as_secs_f64())
                .collect(),
        )
    };
    let cpu = |r: &IdleRun| r.cpu.as_secs_f64() * 1000.0;
    let wakeups = |r: &IdleRun| r.wakeups as f64;
    println!("\nIdle: upstream connected, no device (medians of the runs, per second):\n");
    println!("| system | CPU ms/s | wake-ups/s | threads | runs |");
    println!("|---|---:|---:|---:|---:|");
    let mut bridge = None;
    for runs in groups.iter().filter(|g| !g.is_empty()) {
        let (c, w) = (per_sec(runs, cpu), per_sec(runs, wakeups));
        if runs[0].label == Sut::Bridge.label() {
            bridge = c.zip(w);
        }
        let ok = runs.iter().filter(|r| r.error.is_none()).count();
        println!(
            "| {} | {} | {} | {} | {ok}/{} |",
            runs[0].label,
            c.map_or("-".into(), |v| format!("{v:.2}")),
            w.map_or("-".into(), |v| format!("{v:.1}")),
            runs.iter().map(|r| r.threads).max().unwrap_or(0),
            runs.len()
        );
    }
    let Some((bridge_cpu, bridge_wakeups)) = bridge else {
        return;
    };
    println!();
    for runs in groups
        .iter()
        .filter(|g| !g.is_empty() && g[0].label != Sut::Bridge.label())
    {
        if let (Some(c), Some(w)) = (per_sec(runs, cpu), per_sec(runs, wakeups)) {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}x", a / b)
                } else {
                    "-".into()
                }
            };
            println!(
                "  {} / bridge: CPU {}, wake-ups {}",
                runs[0].label,
                ratio(c, bridge_cpu),
                ratio(w, bridge_wakeups)
            );
        }
    }
}
