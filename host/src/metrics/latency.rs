//! A latency histogram that the hot path can bump without a lock and the
//! status page can read: fixed buckets from 1 µs to 10 s, counts in atomics.
//!
//! It encodes as an OpenMetrics histogram (so Grafana gets quantiles from
//! its buckets) and gives the page its count, mean and an upper bound of a
//! quantile. `prometheus-client`'s own `Histogram` takes a mutex per
//! observation and does not let its values be read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds of the buckets, in seconds (a last, unbounded one follows).
const BOUNDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
struct Inner {
    /// Observations per bucket (not cumulative); the last is unbounded.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// How long something took, counted by bucket. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Latency(Arc<Inner>);

/// What the status page shows of a [`Latency`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    pub count: u64,
    /// Mean, seconds (0 with no observation).
    pub mean_seconds: f64,
    /// The upper bound of the bucket holding the 99th percentile, seconds
    /// (`None` with no observation, or when it is over the last bound).
    pub p99_seconds: Option<f64>,
}

impl Latency {
    /// Records `n` observations of `each`.
    pub fn observe_n(&self, each: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let secs = each.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        let inner = &self.0;
        inner.buckets[bucket].fetch_add(n, Ordering::Relaxed);
        let ns = u64::try_from(each.as_nanos()).unwrap_or(u64::MAX);
        inner
            .sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
        inner.count.fetch_add(n, Ordering::Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        // The smallest bucket holding at least 99 % of the observations.
        let wanted = count - count / 100;
        let mut seen = 0;
        let p99 = counts
            .iter()
            .zip(BOUNDS.iter().map(Some).chain([None]))
            .find_map(|(c, bound)| {
                seen += c;
                (seen >= wanted).then_some(bound.copied())
            });
        LatencySummary {
            count,
            mean_seconds: sum / count as f64,
            p99_seconds: p99.flatten(),
        }
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_gives_the_count_the_mean_and_the_bucket_of_the_99th_percentile() {
        let l = Latency::default();
        assert_eq!(l.summary(), LatencySummary::default());
        l.observe_n(Duration::from_micros(20), 99);
        l.observe_n(Duration::from_millis(30), 1);
        let s = l.summary();
        assert_eq!(s.count, 100);
        let mean = (99.0 * 20e-6 + 30e-3) / 100.0;
        assert!((s.mean_seconds - mean).abs() < 1e-12, "{s:?}");
        assert_eq!(s.p99_seconds, Some(2.5e-5));
        l.observe_n(Duration::from_millis(30), 9);
        assert_eq!(l.summary().p99_seconds, Some(5e-2));
        l.observe_n(Duration::from_secs(60), 1000);
        assert_eq!(l.summary().p99_seconds, None, "beyond the last bound");
    }

    #[test]
    fn it_encodes_as_a_histogram_with_cumulative_buckets() {
        let mut registry = prometheus_client::registry::Registry::default();
        let l = Latency::default();
        registry.register("took", "How long", l.clone());
        l.observe_n(Duration::from_micros(1), 2);
        l.observe_n(Duration::from_secs(1), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE took histogram\n"), "{text}");
        assert!(text.contains("took_count 3\n"), "{text}");
        assert!(
            text.contains("took_bucket{le=\"1e-6\"} 2\n")
                || text.contains("took_bucket{le=\"0.000001\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("took_bucket{le=\"+Inf\"} 3\n"), "{text}");
    }
}
