//! Prometheus exposition behind `ThreadedProxy::Metrics`: the text format
//! (OpenMetrics) of every counter and gauge Ruby hands over (the values of
//! `ThreadedProxy.stats` and `async_stats`, whatever keys they have), and two
//! histograms recorded here when an exchange ends: time to the origin's
//! response head and total time, labelled by origin host.
//!
//! The format is written by the Prometheus project's `prometheus-client`
//! crate, not by hand. Every series carries the pid of the process (a Puma
//! cluster worker answers for itself only, so workers stay separate
//! series). The host label is bounded: only the hosts the app listed
//! (`metrics_hosts`) get their own, every other is "other", so a URL built
//! from user input cannot grow the number of series.

use std::borrow::Cow;
use std::sync::RwLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::origin_url::Target;

/// Upper bounds (seconds) of the latency buckets: from a pooled local
/// origin (a millisecond) to the default header and idle timeouts (60 s).
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The host label of every origin not in `metrics_hosts`.
pub const OTHER: &str = "other";

/// The one label a latency series has: `[("host", label)]`.
type HostLabel = Vec<(String, String)>;
/// One histogram per host label, made on first use.
type Histograms = Family<HostLabel, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// A value handed over from Ruby: stats are integers, a few may be floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A counter or gauge from `ThreadedProxy.stats` (almost all of them).
    Int(i64),
    /// A gauge Ruby computes as a Float (a rate, a ratio).
    Float(f64),
}

/// The per-process histograms and the list of hosts that get a label.
pub struct Metrics {
    /// Lowercased `metrics_hosts`: the origins whose latencies get their
    /// own `host` label; a lock because `configure` may change them while
    /// exchanges record (readers far outnumber writers).
    hosts: RwLock<Vec<String>>,
    /// Seconds from sending the request to the origin's response head, by
    /// host label: how slow the origins are.
    time_to_first_byte: Histograms,
    /// Seconds from the exchange's start to its last byte to the client,
    /// by host label: what clients wait, body included.
    total_time: Histograms,
}

impl Metrics {
    pub fn new(hosts: Vec<String>) -> Self {
        let metrics = Metrics {
            hosts: RwLock::new(Vec::new()),
            time_to_first_byte: Family::new_with_constructor(histogram as fn() -> Histogram),
            total_time: Family::new_with_constructor(histogram as fn() -> Histogram),
        };
        metrics.set_hosts(hosts);
        metrics
    }

    /// The hosts (`host` or `host:port`, any case) that get their own label.
    pub fn set_hosts(&self, hosts: Vec<String>) {
        let hosts = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        *self.hosts.write().unwrap_or_else(|e| e.into_inner()) = hosts;
    }

    /// The label for `target`: its `host:port` or `host` when listed (the
    /// first form wins), else "other".
    pub fn host_label(&self, target: &Target) -> String {
        let host = target.host_in_url().to_ascii_lowercase();
        let with_port = target.address().to_ascii_lowercase();
        let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        if hosts.contains(&with_port) {
            with_port
        } else if hosts.contains(&host) {
            host
        } else {
            OTHER.to_owned()
        }
    }

    /// Records one finished exchange (time to first byte only when the
    /// origin answered).
    pub fn observe(&self, target: &Target, time_to_first_byte: Option<Duration>, total_time: Duration) {
        let label = vec![("host".to_owned(), self.host_label(target))];
        if let Some(ttfb) = time_to_first_byte {
            self.time_to_first_byte
                .get_or_create(&label)
                .observe(ttfb.as_secs_f64());
        }
        self.total_time
            .get_or_create(&label)
            .observe(total_time.as_secs_f64());
    }

    /// The exposition text: `values` (name, value) as counters or gauges by
    /// name (see [`is_gauge`]), then the histograms, every series labelled
    /// with `pid`. A name repeated or empty after cleaning is skipped.
    pub fn render(&self, pid: u32, values: &[(String, Value)]) -> String {
        let labels = [(Cow::Borrowed("pid"), Cow::Owned(pid.to_string()))];
        let mut registry = Registry::with_prefix_and_labels("threaded_proxy", labels.into_iter());
        let mut seen = std::collections::HashSet::new();
        for (name, value) in values {
            let name = metric_name(name);
            if name.is_empty() || !seen.insert(name.clone()) {
                continue;
            }
            let help = format!("threaded-proxy {name}");
            match (is_gauge(&name), *value) {
                (true, Value::Int(n)) => registry.register(name, help, ConstGauge::new(n)),
                (true, Value::Float(f)) => registry.register(name, help, ConstGauge::new(f)),
                (false, Value::Int(n)) => {
                    registry.register(name, help, ConstCounter::new(u64::try_from(n).unwrap_or(0)))
                }
                (false, Value::Float(f)) => registry.register(name, help, ConstCounter::new(f.max(0.0))),
            }
        }
        registry.register_with_unit(
            "time_to_first_byte",
            "Time from the start of an exchange to the origin's response head, by origin host",
            Unit::Seconds,
            self.time_to_first_byte.clone(),
        );
        registry.register_with_unit(
            "total_time",
            "Time from the start of an exchange to its end, by origin host",
            Unit::Seconds,
            self.total_time.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Whether a stat is a level (may go down) rather than a running total:
/// what is open, alive, queued or in flight now.
pub fn is_gauge(name: &str) -> bool {
    const LEVELS: [&str; 11] = [
        "active",
        "alive",
        "queued",
        "in_flight",
        "running",
        "retrying",
        "dead",
        "open",
        "pending",
        "depth",
        "in_use",
    ];
    let name = name.strip_suffix("_total").unwrap_or(name);
    LEVELS.iter().any(|level| {
        name == *level || name.ends_with(&format!("_{level}")) || name.starts_with(&format!("{level}_"))
    }) || name.contains("_alive_")
        || name.ends_with("_kb")
}

/// A Prometheus metric name from a stats key: ASCII letters, digits and
/// underscores; a `_total` suffix is dropped (the encoder adds it to
/// counters).
fn metric_name(key: &str) -> String {
    let cleaned: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches('_');
    let cleaned = cleaned.strip_suffix("_total").unwrap_or(cleaned);
    if cleaned.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{cleaned}")
    } else {
        cleaned.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin_url::{self, Kind};

    fn target(url: &str) -> Target {
        origin_url::check(url, Kind::Http).unwrap()
    }

    #[test]
    fn counters_gauges_and_histograms_render_with_the_pid_label() {
        let metrics = Metrics::new(vec!["Files.Internal".to_owned(), "127.0.0.1:9000".to_owned()]);
        metrics.observe(
            &target("http://files.internal/a"),
            Some(Duration::from_millis(3)),
            Duration::from_millis(20),
        );
        metrics.observe(&target("http://127.0.0.1:9000/b"), None, Duration::from_secs(2));
        metrics.observe(
            &target("http://evil.example/c"),
            Some(Duration::from_millis(1)),
            Duration::from_millis(2),
        );
        let text = metrics.render(
            42,
            &[
                ("started".to_owned(), Value::Int(7)),
                ("active".to_owned(), Value::Int(2)),
                ("async_queued".to_owned(), Value::Int(3)),
                ("callback_threads_alive".to_owned(), Value::Int(2)),
                ("started".to_owned(), Value::Int(99)),
            ],
        );
        assert!(text.contains("# TYPE threaded_proxy_started counter\n"), "{text}");
        assert!(
            text.contains("threaded_proxy_started_total{pid=\"42\"} 7\n"),
            "{text}"
        );
        assert!(!text.contains(" 99\n"), "a repeated name is skipped: {text}");
        assert!(text.contains("# TYPE threaded_proxy_active gauge\n"), "{text}");
        assert!(
            text.contains("threaded_proxy_async_queued{pid=\"42\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE threaded_proxy_callback_threads_alive gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE threaded_proxy_total_time_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("threaded_proxy_total_time_seconds_count{pid=\"42\",host=\"files.internal\"} 1\n"),
            "{text}"
        );
        // 2 s: above the 1.0 bound, within 2.5.
        for (le, n) in [("1.0", 0), ("2.5", 1), ("+Inf", 1)] {
            let line = format!("threaded_proxy_total_time_seconds_bucket{{pid=\"42\",le=\"{le}\",host=\"127.0.0.1:9000\"}} {n}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains("threaded_proxy_time_to_first_byte_seconds_count{pid=\"42\",host=\"other\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn names_are_cleaned_and_levels_are_gauges() {
        assert_eq!(metric_name("failed_connect"), "failed_connect");
        assert_eq!(metric_name("Bytes-To.Client_total"), "bytes_to_client");
        assert_eq!(metric_name("5xx"), "_5xx");
        for gauge in [
            "active",
            "tasks_alive",
            "callbacks_queued",
            "async_in_flight",
            "async_dead",
            "streams_open",
        ] {
            assert!(is_gauge(gauge), "{gauge}");
        }
        for counter in [
            "started",
            "completed",
            "failed_overload",
            "bytes_spliced",
            "async_delivered",
            "rejected",
        ] {
            assert!(!is_gauge(counter), "{counter}");
        }
    }

    #[test]
    fn unlisted_and_unparsable_hosts_are_other() {
        let metrics = Metrics::new(vec!["a.test".to_owned()]);
        assert_eq!(metrics.host_label(&target("https://A.test/x")), "a.test");
        assert_eq!(metrics.host_label(&target("http://b.test/x")), OTHER);
        assert_eq!(metrics.host_label(&target("http://[::1]:80/")), OTHER);
        metrics.set_hosts(vec!["b.test:8080".to_owned()]);
        assert_eq!(metrics.host_label(&target("http://b.test:8080/")), "b.test:8080");
        assert_eq!(metrics.host_label(&target("http://a.test/")), OTHER);
    }
}
