//! Idle HTTP/1.1 keep-alive connections give their buffers back.
//!
//! hyper keeps a read and a write buffer (8 KiB each) for the whole life of a connection, so a
//! proxy holding many idle keep-alive connections would hold ~16 KiB each for nothing. [`IdleIo`]
//! wraps the client socket; once a connection has been between requests with nothing to read
//! for [`RELEASE_AFTER`], it ends hyper's session with an end-of-stream. hyper, being between
//! two requests, finishes cleanly and frees its state, and the socket is handed back
//! ([`Session::take_parked`]) so [`crate::http::serve`] can wait for the client's next request
//! holding nothing but the socket, then serve it with a fresh session.
//!
//! Rebuilding a session per request costs ~3% more user-space instructions than keeping it, so a
//! connection keeps its session through short pauses, while the memory this can hold is
//! bounded: beyond [`LINGERING_SESSIONS`] live sessions in the process, an idle session is
//! released at once (as nginx does for every idle keep-alive connection).
//!
//! Invariant: a session is ended only while hyper is between requests: no exchange in flight
//! (an [`Exchange`] lives until its response body is dropped, which hyper does once the body has
//! been written out), nothing read since the last response bytes were written (a request head
//! may be half-read), no write waiting for the socket, and the connection not upgraded.
//! One case remains that hyper sees as cut off: a pipelined request that arrived in the same read
//! as the one before it and whose rest then stalls for [`RELEASE_AFTER`]. The connection is then
//! closed without an answer to it, which pipelining clients must expect of any server
//! (RFC 9112 §9.3.2).
use crate::transport::Transport;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Quiet time after which an idle connection's session is ended. The check is armed once per
/// session and re-armed when it finds traffic, so a busy connection pays one timer per period,
/// not one per request; an idle connection is released one to two periods after its last
/// request.
pub const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// Live sessions (in all listeners) up to which idle ones linger for [`RELEASE_AFTER`]: at
/// ~16 KiB each, at most ~4 MiB is held by idle connections.
pub const LINGERING_SESSIONS: usize = 256;

/// Live HTTP/1.1 sessions in the process (parked connections not included).
static LIVE_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// What the service and the socket wrapper of one client connection share.
pub struct Session<T> {
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
    /// The socket, put here when a session ends because the connection went idle.
    parked: Mutex<Option<T>>,
}

impl<T> Default for Session<T> {
    fn default() -> Self {
        Session { in_flight: AtomicUsize::new(0), upgraded: AtomicBool::new(false), parked: Mutex::new(None) }
    }
}

impl<T: Send + 'static> Session<T> {
    /// Counts a request as in flight until the returned guard is dropped.
    pub fn exchange(self: &Arc<Self>) -> Exchange {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Exchange(self.clone())
    }

    /// The socket of a session that ended because the connection went idle; `None` when the
    /// session ended for any other reason (client closed, error, upgrade).
    pub fn take_parked(&self) -> Option<T> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && !self.upgraded.load(Ordering::Relaxed)
    }
}

/// What an [`Exchange`] needs of its session, whatever the session's transport.
trait InFlight: Send + Sync {
    fn counter(&self) -> &AtomicUsize;
    fn upgraded_flag(&self) -> &AtomicBool;
}

impl<T: Send> InFlight for Session<T> {
    fn counter(&self) -> &AtomicUsize {
        &self.in_flight
    }

    fn upgraded_flag(&self) -> &AtomicBool {
        &self.upgraded
    }
}

/// A request in flight on a [`Session`].
pub struct Exchange(Arc<dyn InFlight>);

impl Exchange {
    /// The connection switches protocols after this response: never end its session.
    pub fn upgraded(&self) {
        self.0.upgraded_flag().store(true, Ordering::Relaxed);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.0.counter().fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client socket as one hyper session sees it.
///
/// It also enforces the header read timeout (hyper's own would cost a boxed timer per
/// request): a request head whose first bytes arrived more than `header_timeout` ago and that
/// is still incomplete when the socket runs dry ends the session with `TimedOut`. The one timer
/// is armed only while waiting (idle, or in the middle of a head), never per request.
pub struct IdleIo<T: Transport> {
    /// `None` once handed back to the session.
    stream: Option<T>,
    session: Arc<Session<T>>,
    header_timeout: Duration,
    /// Reads that returned data, and their count when the release timer was last armed.
    reads: u64,
    armed_at: u64,
    read_since_write: bool,
    /// When the first bytes after the last write arrived: the start of a request head.
    head_started: Instant,
    write_blocked: bool,
    timer: Option<Pin<Box<Sleep>>>,
    timer_for: TimerUse,
    released: bool,
}

/// What the timer is set for.
#[derive(PartialEq)]
enum TimerUse {
    /// The end of a quiet period between requests.
    Release,
    /// The header read deadline of the request head that started at the given time.
    Head(Instant),
}

impl<T: Transport> IdleIo<T> {
    pub fn new(stream: T, session: Arc<Session<T>>, header_timeout: Duration) -> IdleIo<T> {
        LIVE_SESSIONS.fetch_add(1, Ordering::Relaxed);
        IdleIo {
            stream: Some(stream),
            session,
            header_timeout,
            reads: 0,
            armed_at: 0,
            read_since_write: false,
            head_started: Instant::now(),
            write_blocked: false,
            timer: None,
            timer_for: TimerUse::Release,
            released: false,
        }
    }

    /// The timer, set for `usage` unless it already serves that use; `deadline` is only
    /// computed when it is (re)set, so a busy connection reads no clock here. Setting it
    /// also starts a quiet period: `armed_at` records the reads so far.
    fn arm(&mut self, usage: TimerUse, deadline: impl FnOnce() -> Instant) -> Pin<&mut Sleep> {
        let fresh = self.timer_for != usage || self.timer.is_none();
        self.timer_for = usage;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::ZERO)));
        if fresh {
            self.armed_at = self.reads;
            timer.as_mut().reset(deadline());
        }
        timer.as_mut()
    }

    fn stream(&mut self) -> Pin<&mut T> {
        // The stream is only taken in Drop.
        Pin::new(self.stream.as_mut().expect("stream present until drop"))
    }

    /// The socket has nothing to read. A request head half-read is held to the header read
    /// timeout; between requests, the session ends (end-of-stream) once nothing was read for a
    /// whole period, or at once if many sessions live.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_blocked || !self.session.idle() {
            return Poll::Pending;
        }
        if self.read_since_write {
            let deadline = self.head_started + self.header_timeout;
            ready!(self.arm(TimerUse::Head(self.head_started), || deadline).poll(cx));
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request head incomplete after the header read timeout ({:?})", self.header_timeout),
            )));
        }
        if LIVE_SESSIONS.load(Ordering::Relaxed) > LINGERING_SESSIONS {
            self.released = true;
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.arm(TimerUse::Release, || Instant::now() + RELEASE_AFTER).poll(cx));
            if self.armed_at == self.reads {
                self.released = true;
                return Poll::Ready(Ok(()));
            }
            // Traffic since the timer was set: look again a whole period from now.
            self.armed_at = self.reads;
            if let Some(t) = &mut self.timer {
                t.as_mut().reset(Instant::now() + RELEASE_AFTER);
            }
        }
    }

    fn wrote(&mut self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.read_since_write = false;
                self.write_blocked = false;
            }
            Poll::Pending => self.write_blocked = true,
            _ => {}
        }
    }
}

impl<T: Transport> Drop for IdleIo<T> {
    fn drop(&mut self) {
        LIVE_SESSIONS.fetch_sub(1, Ordering::Relaxed);
        if self.released {
            *self.session.parked.lock().unwrap_or_else(|p| p.into_inner()) = self.stream.take();
        }
    }
}

impl<T: Transport> AsyncRead for IdleIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.released {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match this.stream().poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx),
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.reads += 1;
                    if !this.read_since_write {
                        this.head_started = Instant::now();
                        this.read_since_write = true;
                    }
                }
                Poll::Ready(Ok(()))
            }
            err => err,
        }
    }
}

impl<T: Transport> AsyncWrite for IdleIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.stream().poll_write(cx, buf);
        this.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.stream().poll_write_vectored(cx, bufs);
        this.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.released {
            // The socket outlives this session: do not shut it down.
            return Poll::Ready(Ok(()));
        }
        this.stream().poll_shutdown(cx)
    }
}

/// Hands memory freed by released connections back to the operating system. glibc's malloc
/// keeps freed heap pages resident, so without this the RSS would stay at the peak number of
/// active connections. Debounced: the trim runs, off the worker thread, once releases have
/// been quiet for [`TRIM_AFTER_QUIET`]; under sustained load (releases all the time) it waits,
/// as the freed memory is about to be reused anyway.
pub fn trim_soon() {
    static SCHEDULED: AtomicBool = AtomicBool::new(false);
    static RELEASES: AtomicUsize = AtomicUsize::new(0);
    RELEASES.fetch_add(1, Ordering::Relaxed);
    if SCHEDULED.swap(true, Ordering::Relaxed) {
        return;
    }
    tokio::spawn(async {
        loop {
            let seen = RELEASES.load(Ordering::Relaxed);
            tokio::time::sleep(TRIM_AFTER_QUIET).await;
            if RELEASES.load(Ordering::Relaxed) == seen {
                break;
            }
        }
        SCHEDULED.store(false, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(trim).await;
    });
}

/// How long releases must pause before freed memory is trimmed.
const TRIM_AFTER_QUIET: Duration = Duration::from_millis(500);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // FFI call into the C allocator; there is no safe binding.
fn trim() {
    // SAFETY: malloc_trim takes the allocator's own locks and only returns free pages; it
    // touches no memory that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
