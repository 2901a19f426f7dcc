//! The benchmark load driver. One run = one mode against one URL; the
//! result is one JSON object on stdout (progress goes to stderr), which
//! `bench/harness.rb` turns into the tables.
//!
//! Modes:
//!
//! - `download --url U [--timeout-secs 120]`: one GET on a new connection,
//!   body read and discarded; bytes, seconds, MB/s.
//! - `burst --url U --requests 1000 [--probe-url P --probe-interval-ms 10]`:
//!   N requests started at once (new connection each); wall time until the
//!   last answer, latency percentiles, and, while the burst runs, a
//!   sequential probe of P (the "inline action during the load").
//! - `rate --url U --connections 32 --duration-secs 10 --warmup-secs 2
//!   [--keep-alive]`: closed loop, a new connection per request unless
//!   `--keep-alive`; requests/s and latency percentiles.
//! - `sse --url U --streams N [--window 256 --hold-secs 8 --watch-pid PID…
//!   --origin-stats URL]`: opens N event streams, holds them, closes them all
//!   and reports health, RSS of the watched processes and how long the
//!   origin kept its streams open afterwards.
//! - `events --url U --publish-url P --streams N [--publishes 20
//!   --hold-secs S --rate-secs S --probe-url I --group-header H]`: SSE
//!   subscribers fed by publishes the driver asks the app for; latency from
//!   publish to every client, RSS per stream, delivered events/s (events.rs).
//!
//! - `tcp --addr H:P --what push|short|idle` and `tcp-sink --port P`: raw
//!   TCP through a content-routing proxy (the machine scenario, tcp.rs).
//!
//! Common: `--threads 2` (tokio workers), `--max-secs 600` (the whole run
//! is aborted past this, whatever the mode).

mod events;
mod http;
mod modes;
mod ramp;
mod report;
mod tcp;

use std::collections::HashMap;
use std::time::Duration;

/// Flags that take no value.
const SWITCHES: &[&str] = &["--keep-alive"];

/// `--name value` pairs (repeatable) and switches.
pub struct Args {
    values: HashMap<String, Vec<String>>,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut raw = raw.peekable();
        while let Some(flag) = raw.next() {
            if !flag.starts_with("--") {
                return Err(format!("unexpected argument {flag}"));
            }
            let value = if SWITCHES.contains(&flag.as_str()) {
                "true".to_owned()
            } else {
                raw.next().ok_or_else(|| format!("{flag} needs a value"))?
            };
            values.entry(flag).or_default().push(value);
        }
        Ok(Args { values })
    }

    pub fn string(&self, name: &str) -> Option<&str> {
        self.values.get(name).and_then(|v| v.last()).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, String> {
        self.string(name).ok_or_else(|| format!("{name} is required"))
    }

    pub fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.string(name) {
            None => Ok(default),
            Some(value) => value
                .parse()
                .map_err(|_| format!("bad value for {name}: {value}")),
        }
    }

    pub fn switch(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it: the SSE
/// mode holds one descriptor per stream.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    }
}

fn main() {
    let mut raw = std::env::args().skip(1);
    let mode = raw.next().unwrap_or_default();
    let args = match Args::parse(raw) {
        Ok(args) => args,
        Err(message) => fail(&message),
    };
    let threads = args.number("--threads", 2usize).unwrap_or_else(|m| fail(&m));
    let max_secs = args.number("--max-secs", 600u64).unwrap_or_else(|m| fail(&m));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let run = async {
        match mode.as_str() {
            "download" => modes::download(&args).await,
            "burst" => modes::burst(&args).await,
            "rate" => modes::rate(&args).await,
            "sse" => modes::sse(&args).await,
            "events" => events::events(&args).await,
            "tcp" => tcp::client(&args).await,
            "tcp-sink" => tcp::sink(&args).await,
            other => Err(format!(
                "unknown mode {other:?}: download | burst | rate | sse | events | tcp | tcp-sink"
            )),
        }
    };
    let result = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(max_secs), run)
            .await
            .unwrap_or_else(|_| Err(format!("run exceeded --max-secs {max_secs}")))
    });
    // Open sockets and stuck tasks must not delay exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(json) => println!("{json}"),
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("bench-loadgen: {message}");
    std::process::exit(1);
}
