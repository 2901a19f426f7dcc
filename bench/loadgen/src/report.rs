//! Result plumbing: percentiles, failure tallies, a tiny JSON writer (the
//! harness reads one JSON object per run from stdout; no serde needed for
//! flat objects of numbers and strings), and /proc readings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::http::Failure;

/// Latency samples in microseconds, capped so a long run cannot grow
/// without bound (the count keeps going past the cap).
pub struct Samples {
    micros: Vec<u32>,
    cap: usize,
    pub count: u64,
}

impl Samples {
    pub fn new(cap: usize) -> Self {
        Samples {
            micros: Vec::new(),
            cap,
            count: 0,
        }
    }

    pub fn record(&mut self, latency: std::time::Duration) {
        self.count += 1;
        if self.micros.len() < self.cap {
            self.micros.push(latency.as_micros().min(u32::MAX as u128) as u32);
        }
    }

    pub fn merge(&mut self, other: Samples) {
        self.count += other.count;
        let room = self.cap.saturating_sub(self.micros.len());
        self.micros.extend(other.micros.into_iter().take(room));
    }

    /// Nearest-rank percentile in milliseconds (`p` in 0..=100).
    pub fn percentile_ms(&mut self, p: f64) -> Option<f64> {
        if self.micros.is_empty() {
            return None;
        }
        self.micros.sort_unstable();
        let rank = ((p / 100.0) * self.micros.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.micros.len()) - 1;
        Some(self.micros[index] as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> Option<f64> {
        self.micros.iter().max().map(|&m| m as f64 / 1000.0)
    }
}

/// Counts of failures by kind and of answers by status code.
#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub failures: BTreeMap<&'static str, u64>,
}

impl Tally {
    pub fn status(&mut self, status: u16) {
        *self.statuses.entry(status).or_insert(0) += 1;
        if (200..300).contains(&status) {
            self.ok += 1;
        }
    }

    pub fn failure(&mut self, failure: Failure) {
        *self.failures.entry(failure.name()).or_insert(0) += 1;
    }

    pub fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_insert(0) += n;
        }
        for (name, n) in other.failures {
            *self.failures.entry(name).or_insert(0) += n;
        }
    }

    pub fn json_fields(&self, object: &mut JsonObject) {
        object.int("ok", self.ok);
        let mut statuses = JsonObject::new();
        for (status, n) in &self.statuses {
            statuses.int(&status.to_string(), *n);
        }
        object.raw("statuses", &statuses.finish());
        let mut failures = JsonObject::new();
        for (name, n) in &self.failures {
            failures.int(name, *n);
        }
        object.raw("failures", &failures.finish());
    }
}

/// Builds one flat-ish JSON object.
pub struct JsonObject {
    out: String,
    first: bool,
}

impl JsonObject {
    pub fn new() -> Self {
        JsonObject {
            out: String::from("{"),
            first: true,
        }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push_str(&quote(key));
        self.out.push(':');
    }

    pub fn int(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn signed(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// A float, or null when absent or not finite.
    pub fn num(&mut self, key: &str, value: Option<f64>) -> &mut Self {
        self.key(key);
        match value {
            Some(v) if v.is_finite() => {
                let _ = write!(self.out, "{v:.6}");
            }
            _ => self.out.push_str("null"),
        }
        self
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.out.push_str(&quote(value));
        self
    }

    /// Pre-rendered JSON (a nested object).
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.key(key);
        self.out.push_str(json);
        self
    }

    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// CPU time (user + system) this process has used so far, in seconds: the
/// driver's own share of the machine in the download scenario.
pub fn own_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return None;
        }
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// Resident set size of a process in KiB (VmRSS), if it still runs.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

/// Open descriptors of a process, if it still runs (and we may look).
pub fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|dir| dir.count() as u64)
}

/// Sum of a reading over several processes (nginx: its workers); None
/// when no process was given or none could be read.
pub fn sum_over(pids: &[u32], read: fn(u32) -> Option<u64>) -> Option<u64> {
    let values: Vec<u64> = pids.iter().filter_map(|&pid| read(pid)).collect();
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples = Samples::new(100);
        for ms in 1..=100u64 {
            samples.record(std::time::Duration::from_millis(ms));
        }
        assert_eq!(samples.percentile_ms(50.0), Some(50.0));
        assert_eq!(samples.percentile_ms(99.0), Some(99.0));
        assert_eq!(samples.percentile_ms(100.0), Some(100.0));
        assert_eq!(Samples::new(1).percentile_ms(50.0), None);
    }

    #[test]
    fn json_is_escaped() {
        let mut object = JsonObject::new();
        object.str("a\"b", "c\nd").num("x", None).int("n", 3);
        assert_eq!(object.finish(), r#"{"a\"b":"c\u000ad","x":null,"n":3}"#);
    }
}
