//! The machine: a content-aware TCP router (ProxyMachine's model).
//!
//! Rust accepts and reads each client; the bytes so far go to a Ruby block
//! as a [`Job`] on the machine's own queue, and the block's [`Answer`] says
//! where the connection goes (`route`), after which the two sockets are
//! joined both ways without Ruby (`join`). This file holds the listener,
//! the accept loop and the state a running machine shares with its
//! connections; nothing here touches the Ruby VM.

pub mod join;
pub mod route;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::callbacks::BlockingQueue;
use crate::runtime::Tracker;

/// How one machine listens and how long it lets things take.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// 0 picks a free port ([`Machine::port`] says which).
    pub port: u16,
    /// SO_REUSEPORT, so several processes (`-w N`) share one port.
    pub reuse_port: bool,
    /// The most bytes the block is given; a client that sends more before
    /// it decides is closed.
    pub max_route_bytes: usize,
    /// A block that has not answered by then closes its connection.
    pub route_timeout: Duration,
    /// Per connect attempt, when the answer names none.
    pub connect_timeout: Duration,
    /// Connect attempts on "connection refused", and the pause between.
    pub connect_tries: u32,
    pub connect_retry_delay: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            host: "127.0.0.1".to_owned(),
            port: 0,
            reuse_port: false,
            max_route_bytes: 64 * 1024,
            route_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            connect_tries: 10,
            connect_retry_delay: Duration::from_millis(100),
        }
    }
}

/// Where the block sends a connection (`{remote: "host:port", …}`).
#[derive(Debug, Clone, Default)]
pub struct Remote {
    pub address: String,
    /// Sent to the remote instead of the buffered bytes (`data:`).
    pub data: Option<Bytes>,
    /// Sent to the client before joining (`reply:`).
    pub reply: Option<Bytes>,
    pub connect_timeout: Option<Duration>,
    /// Both ways silent this long: the connection is cut and
    /// `proxy_inactivity_error` runs. None: no limit.
    pub inactivity_timeout: Option<Duration>,
}

/// The block's decision about the bytes it was shown.
#[derive(Debug)]
pub enum Answer {
    Remote(Remote),
    /// Wait for more bytes and ask again.
    Noop,
    /// Close the client, after sending these bytes if any.
    Close(Option<Bytes>),
    /// The block raised or answered garbage; Ruby has logged why. The
    /// connection is closed.
    Failed,
}

/// What the machine's Ruby threads are asked to do.
pub enum Job {
    /// Run the routing block on `data` (the whole buffer so far).
    Route {
        data: Bytes,
        reply: oneshot::Sender<Answer>,
    },
    /// `proxy_connect_error { |remote| }` (no reply).
    ConnectError { remote: String },
    /// `proxy_inactivity_error { |remote| }` (no reply).
    Inactivity { remote: String },
    /// A line for the machine's logger (Rust has no logger of its own).
    Log { message: String },
}

/// The machine's counters (plain atomics: the connections add, `snapshot`
/// reads).
#[derive(Default)]
pub struct MachineStats {
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    pub routed: AtomicU64,
    pub closed_by_block: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Connect attempts that were refused and tried again.
    pub connect_retries: AtomicU64,
    pub inactivity_cuts: AtomicU64,
    /// Block raised, hung past route_timeout or answered garbage.
    pub route_failures: AtomicU64,
    /// Clients closed for sending more than max_route_bytes undecided.
    pub route_overflows: AtomicU64,
    pub bytes_to_remote: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Of the two above, bytes moved by splice(2).
    pub bytes_spliced: AtomicU64,
    pub route_calls: AtomicU64,
    /// Time the block took, summed over `route_calls` (nanoseconds).
    pub route_nanos: AtomicU64,
}

impl MachineStats {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("accepted", self.accepted.load(Relaxed)),
            ("open", self.open.load(Relaxed)),
            ("routed", self.routed.load(Relaxed)),
            ("closed_by_block", self.closed_by_block.load(Relaxed)),
            ("connect_errors", self.connect_errors.load(Relaxed)),
            ("connect_retries", self.connect_retries.load(Relaxed)),
            ("inactivity_cuts", self.inactivity_cuts.load(Relaxed)),
            ("route_failures", self.route_failures.load(Relaxed)),
            ("route_overflows", self.route_overflows.load(Relaxed)),
            ("bytes_to_remote", self.bytes_to_remote.load(Relaxed)),
            ("bytes_to_client", self.bytes_to_client.load(Relaxed)),
            ("bytes_spliced", self.bytes_spliced.load(Relaxed)),
            ("route_calls", self.route_calls.load(Relaxed)),
            ("route_nanos", self.route_nanos.load(Relaxed)),
        ]
    }
}

/// One listening machine, shared by its accept loop, its connections and
/// the Ruby object that controls it.
pub struct Machine {
    /// The port actually bound (the answer to `port: 0`).
    pub port: u16,
    /// Fixed at start.
    pub settings: Settings,
    /// Where connections ask the Ruby block; the machine's Ruby threads
    /// wait on it with the GVL released.
    pub jobs: BlockingQueue<Job>,
    pub stats: MachineStats,
    /// Open connections, so `stop` can wait until none is left.
    pub tracker: Tracker,
    /// Set: the accept loop ends and the listener closes.
    stop_accepting: watch::Sender<bool>,
    /// Set: every connection is dropped now (end of a drain).
    cut: watch::Sender<bool>,
    /// Set by the accept loop once it has dropped the listener:
    /// `stop_accepting` waits for it, so a connect made after it returns
    /// is refused (not accepted by a loop that has not seen the stop yet).
    listener_closed: (std::sync::Mutex<bool>, std::sync::Condvar),
}

impl Machine {
    /// Binds now (so a bad host or a taken port is the caller's error) and
    /// runs the accept loop on `handle`.
    pub fn start(settings: Settings, handle: &tokio::runtime::Handle) -> io::Result<Arc<Machine>> {
        let std_listener = bind(&settings)?;
        let port = std_listener.local_addr()?.port();
        let _entered = handle.enter();
        let listener = TcpListener::from_std(std_listener)?;
        let machine = Arc::new(Machine {
            port,
            settings,
            jobs: BlockingQueue::default(),
            stats: MachineStats::default(),
            tracker: Tracker::default(),
            stop_accepting: watch::channel(false).0,
            cut: watch::channel(false).0,
            listener_closed: Default::default(),
        });
        handle.spawn(accept_loop(machine.clone(), listener));
        Ok(machine)
    }

    /// Ends the accept loop and waits (2 s at most: a runtime that is
    /// gone runs no loop) until the port is closed.
    pub fn stop_accepting(&self) {
        self.stop_accepting.send_replace(true);
        let (lock, closed) = &self.listener_closed;
        let done = lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = closed.wait_timeout_while(done, Duration::from_secs(2), |done| !*done);
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Queues a job that needs no answer (dropped if the machine stopped).
    pub fn notify(&self, job: Job) {
        let _ = self.jobs.push(job);
    }

    pub fn log(&self, message: String) {
        self.notify(Job::Log { message });
    }
}

fn bind(settings: &Settings) -> io::Result<std::net::TcpListener> {
    let addr: SocketAddr = (settings.host.as_str(), settings.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "host resolves to no address"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if settings.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn accept_loop(machine: Arc<Machine>, listener: TcpListener) {
    let mut stop = machine.stop_accepting.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _peer)) => {
                let _ = client.set_nodelay(true);
                machine.stats.accepted.fetch_add(1, Relaxed);
                tokio::spawn(serve(machine.clone(), client));
            }
            // Out of descriptors or a connection reset before accept: wait
            // a moment instead of spinning, then go on.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    // Dropping the listener closes the port: new connects are refused.
    drop(listener);
    let (lock, closed) = &machine.listener_closed;
    *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
    closed.notify_all();
}

/// A connection's hold on its machine from accept to close: counted in
/// `open` and in the tracker (which `stop` waits on). Owned, unlike a
/// `TrackerGuard`, so it moves from the routing task to the join's.
struct Held {
    /// The machine counted in; also what the connection's tasks borrow
    /// (settings, stats, the Ruby queue).
    machine: Arc<Machine>,
}

impl Held {
    fn new(machine: Arc<Machine>) -> Held {
        machine.tracker.arrive();
        machine.stats.open.fetch_add(1, Relaxed);
        Held { machine }
    }

    /// Runs `work` until it ends or the machine cuts every connection
    /// (then the caller drops it, closing its sockets): None. Pinned by
    /// the caller: a future moved in here would take room twice in the
    /// task (the argument and select's copy).
    async fn until_cut<F: std::future::Future>(&self, work: Pin<&mut F>) -> Option<F::Output> {
        let mut cut = self.machine.cut.subscribe();
        tokio::select! {
            done = work => Some(done),
            _ = cut.wait_for(|c| *c) => None,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.machine.stats.open.fetch_sub(1, Relaxed);
        self.machine.tracker.leave();
    }
}

async fn serve(machine: Arc<Machine>, client: tokio::net::TcpStream) {
    let held = Held::new(machine);
    let routed = {
        let routing = pin!(route::run(&held.machine, client));
        held.until_cut(routing).await
    };
    let Some(Some(joined)) = routed else {
        return;
    };
    // A task of its own: the routing task's allocation (sized for its
    // largest state) is freed, and an idle joined connection holds only
    // the join's (issue 18, RSS per idle routed connection).
    tokio::spawn(async move {
        let join = pin!(joined.run(&held.machine));
        held.until_cut(join).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The most bytes a connection's future may take (see the test).
    const SERVE_FUTURE_MAX: usize = 1024;
    /// The most bytes a joined connection's task future may take.
    const JOIN_FUTURE_MAX: usize = 1024;

    /// Plays the Ruby side: answers route jobs with `decide` on a thread,
    /// and tells `seen` what each job showed.
    fn block_thread(
        machine: Arc<Machine>,
        decide: fn(&[u8]) -> Answer,
        seen: std::sync::mpsc::Sender<Bytes>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let flag = AtomicBool::new(false);
            while let Some(job) = machine.jobs.pop_wait(&flag, None) {
                if let Job::Route { data, reply } = job {
                    let _ = reply.send(decide(&data));
                    let _ = seen.send(data);
                }
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_after_noop_replays_the_buffer_and_passes_half_closes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut conn, _) = echo.accept().await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            // Only after the client's half-close reached us: answer, close.
            conn.write_all(&got).await.unwrap();
        });
        let settings = Settings {
            port: 0,
            ..Settings::default()
        };
        let machine = Machine::start(settings, &tokio::runtime::Handle::current()).unwrap();
        static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        PORT.store(echo_port, Relaxed);
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let block = block_thread(
            machine.clone(),
            |data| {
                if data.contains(&b'\n') {
                    Answer::Remote(Remote {
                        address: format!("127.0.0.1:{}", PORT.load(Relaxed)),
                        ..Remote::default()
                    })
                } else {
                    Answer::Noop
                }
            },
            seen_tx,
        );
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", machine.port))
            .await
            .unwrap();
        client.write_all(b"split ").await.unwrap();
        // The block saw the first segment alone before the second is sent.
        let first = tokio::task::spawn_blocking(move || seen.recv_timeout(Duration::from_secs(5)).unwrap());
        assert_eq!(&first.await.unwrap()[..], b"split ");
        client.write_all(b"route\n").await.unwrap();
        client.write_all(b"and after").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"split route\nand after");
        assert_eq!(machine.stats.routed.load(Relaxed), 1);
        machine.stop_accepting();
        machine.jobs.close();
        block.join().unwrap();
    }

    /// An idle routed connection is mostly its task: the future's size is
    /// allocated per connection for as long as it lives (issue 18: RSS per
    /// idle routed connection at most HAProxy's, ~3 KiB).
    #[tokio::test]
    async fn a_connection_future_stays_small() {
        let machine = Machine::start(Settings::default(), &tokio::runtime::Handle::current()).unwrap();
        let client = tokio::net::TcpStream::connect(("127.0.0.1", machine.port))
            .await
            .unwrap();
        let future = serve(machine.clone(), client);
        let size = std::mem::size_of_val(&future);
        let joined = join::connect(
            &machine,
            tokio::net::TcpStream::connect(("127.0.0.1", machine.port))
                .await
                .unwrap(),
            Bytes::new(),
            Remote {
                address: format!("127.0.0.1:{}", machine.port),
                ..Remote::default()
            },
        )
        .await
        .unwrap();
        let held = Held::new(machine.clone());
        let join = async move {
            let join = pin!(joined.run(&held.machine));
            held.until_cut(join).await;
        };
        let join_size = std::mem::size_of_val(&join);
        eprintln!("serve future: {size} bytes; the join's: {join_size}");
        assert!(size <= SERVE_FUTURE_MAX, "serve future is {size} bytes");
        assert!(join_size <= JOIN_FUTURE_MAX, "join future is {join_size} bytes");
        machine.stop_accepting();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_that_never_answers_closes_the_connection_after_route_timeout() {
        let settings = Settings {
            route_timeout: Duration::from_millis(100),
            ..Settings::default()
        };
        let machine = Machine::start(settings, &tokio::runtime::Handle::current()).unwrap();
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", machine.port))
            .await
            .unwrap();
        client.write_all(b"anyone?").await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert!(back.is_empty());
        assert_eq!(machine.stats.route_failures.load(Relaxed), 1);
    }

    /// The one inactivity timer is not reset per byte: it must still see
    /// bytes that moved after it was set, and cut only real silence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn traffic_keeps_a_join_alive_and_silence_cuts_it() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        PORT.store(echo.local_addr().unwrap().port(), Relaxed);
        tokio::spawn(async move {
            let (mut conn, _) = echo.accept().await.unwrap();
            let (mut rd, mut wr) = conn.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
        let machine = Machine::start(Settings::default(), &tokio::runtime::Handle::current()).unwrap();
        let (seen_tx, _seen) = std::sync::mpsc::channel();
        let block = block_thread(
            machine.clone(),
            |_| {
                Answer::Remote(Remote {
                    address: format!("127.0.0.1:{}", PORT.load(Relaxed)),
                    inactivity_timeout: Some(Duration::from_millis(300)),
                    ..Remote::default()
                })
            },
            seen_tx,
        );
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", machine.port))
            .await
            .unwrap();
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        // Twice the limit, a byte each way every 100 ms: never cut.
        for _ in 0..6 {
            client.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap();
        }
        client.read_exact(&mut byte).await.unwrap();
        assert_eq!(machine.stats.inactivity_cuts.load(Relaxed), 0);
        let silent = tokio::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        let waited = silent.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "cut after {waited:?} of silence"
        );
        assert_eq!(machine.stats.inactivity_cuts.load(Relaxed), 1);
        machine.stop_accepting();
        machine.jobs.close();
        block.join().unwrap();
    }
}
