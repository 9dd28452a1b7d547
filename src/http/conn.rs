//! Connections: how many may be open (in total and per client address), and how long a client
//! may take to send a request. Slow clients must not hold connections (and file descriptors)
//! for free: a request's head must arrive within `http.client_timeout`, and its body within
//! `http.client_timeout` after the head.
//!
//! - The first head of a connection is timed by actix (408, then the connection is closed).
//! - Every later head, and the rest of a request body nobody reads, is timed by [`Guarded`], the
//!   connection's I/O: while no request is in flight, reading stops with an error once the
//!   deadline passes (the first byte of a head starts `client_timeout`; a connection idle longer
//!   than keep-alive plus `client_timeout` is closed too), which closes the connection.
//! - Bodies are timed by [`limit_body`]: the payload stream fails at the deadline and the request
//!   is answered 408 (see `http::server`); the connection is then closed.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest};
use actix_web::error::PayloadError;
use actix_web::rt::net::TcpStream;
use actix_web::web::Bytes;
use actix_web::HttpMessage;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Refusals are logged at most this often (with how many there were).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The connection limits, shared by all workers.
#[derive(Debug)]
pub struct ConnLimits {
    max: usize,
    per_ip: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
    refused: u64,
    refused_since_warning: u64,
    warned_at: Option<Instant>,
}

impl ConnLimits {
    /// At most `max` connections, and `per_ip` from one address (0 = no limit per address).
    pub fn new(max: usize, per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max,
            per_ip,
            open: Mutex::default(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn per_ip(&self) -> usize {
        self.per_ip
    }

    /// Connections open now, and refused so far.
    pub fn counts(&self) -> (usize, u64) {
        let open = self.lock();
        (open.total, open.refused)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more connection from `ip`, or None when a limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Permit> {
        let ip = ip.to_canonical();
        let mut open = self.lock();
        let from_ip = open.by_ip.get(&ip).copied().unwrap_or(0);
        let limit = if open.total >= self.max {
            Some(("http.max_connections", self.max))
        } else if self.per_ip > 0 && from_ip >= self.per_ip {
            Some(("http.max_connections_per_ip", self.per_ip))
        } else {
            None
        };
        if let Some((key, value)) = limit {
            open.refused += 1;
            open.refused_since_warning += 1;
            let now = Instant::now();
            if open.warned_at.is_none_or(|at| now >= at + WARN_EVERY) {
                let refused = std::mem::take(&mut open.refused_since_warning);
                open.warned_at = Some(now);
                drop(open);
                tracing::warn!(limit = key, value, client = %ip, refused,
                    "connection limit reached: new connections are closed at once");
            }
            return None;
        }
        open.total += 1;
        *open.by_ip.entry(ip).or_default() += 1;
        Some(Permit {
            limits: self.clone(),
            ip,
        })
    }
}

/// One admitted connection; its place is given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

/// What a connection's I/O and the requests on it share (one worker thread: no locking).
pub struct Conn {
    client_timeout: Duration,
    /// Keep-alive plus `client_timeout`: the longest a connection may wait for a request.
    idle_limit: Duration,
    in_flight: Cell<u32>,
    /// Whether a head has started arriving since the last request finished.
    head_started: Cell<bool>,
    /// When reading fails while no request is in flight.
    deadline: Cell<Instant>,
    /// The connection's reader, woken when the last request finishes so that the deadline is
    /// armed even if the client sends nothing more.
    reader: Cell<Option<Waker>>,
}

impl Conn {
    fn new(client_timeout: Duration, keep_alive: Duration) -> Rc<Conn> {
        let idle_limit = keep_alive + client_timeout;
        Rc::new(Conn {
            client_timeout,
            idle_limit,
            in_flight: Cell::new(0),
            head_started: Cell::new(false),
            deadline: Cell::new(Instant::now() + idle_limit),
            reader: Cell::new(None),
        })
    }

    /// Marks a request in flight until the returned guard is dropped (with its response body).
    pub fn start(self: &Rc<Self>) -> InFlight {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self.clone())
    }

    fn read_some(&self) {
        if self.in_flight.get() == 0 && !self.head_started.replace(true) {
            let head_by = Instant::now() + self.client_timeout;
            self.deadline.set(self.deadline.get().min(head_by));
        }
    }
}

/// A request in flight on its connection (see [`Conn::start`]).
pub struct InFlight(Rc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        let left = conn.in_flight.get().saturating_sub(1);
        conn.in_flight.set(left);
        if left == 0 {
            conn.head_started.set(false);
            conn.deadline.set(Instant::now() + conn.idle_limit);
            if let Some(reader) = conn.reader.take() {
                reader.wake();
            }
        }
    }
}

/// An admitted connection's I/O: the socket, its place in the limits, its read deadline.
pub struct Guarded {
    io: TcpStream,
    conn: Rc<Conn>,
    timer: Pin<Box<Sleep>>,
    _permit: Permit,
}

impl Guarded {
    /// Admits an accepted connection, or drops it (closing it) when a limit is reached.
    pub fn admit(
        io: TcpStream,
        limits: &Arc<ConnLimits>,
        client_timeout: Duration,
        keep_alive: Duration,
    ) -> Option<(Guarded, Option<SocketAddr>)> {
        let peer = io.peer_addr().ok();
        let permit = limits.admit(peer?.ip())?;
        // Answers are written whole; without TCP_NODELAY the short last segment of a longer one
        // (a recording, a range) would wait for the client's delayed ACK.
        let _ = io.set_nodelay(true);
        let conn = Conn::new(client_timeout, keep_alive);
        let timer = Box::pin(tokio::time::sleep_until(conn.deadline.get()));
        let guarded = Guarded {
            io,
            conn,
            timer,
            _permit: permit,
        };
        Some((guarded, peer))
    }

    pub fn conn(&self) -> Rc<Conn> {
        self.conn.clone()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.conn.read_some();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.conn.in_flight.get() > 0 => {
                let waker = match this.conn.reader.take() {
                    Some(w) if w.will_wake(cx.waker()) => w,
                    _ => cx.waker().clone(),
                };
                this.conn.reader.set(Some(waker));
                Poll::Pending
            }
            Poll::Pending => {
                let deadline = this.conn.deadline.get();
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let what = if this.conn.head_started.get() {
                            "request head not received in time"
                        } else {
                            "idle too long"
                        };
                        tracing::debug!(client = ?this.io.peer_addr().ok(), what, "closing connection");
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that keeps its request marked in flight until it is sent (or dropped).
pub struct Tracked {
    body: BoxBody,
    _in_flight: Option<InFlight>,
}

impl Tracked {
    pub fn new(body: BoxBody, in_flight: Option<InFlight>) -> Tracked {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl MessageBody for Tracked {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// Limits the time the request's body may take to `timeout` from now (its head is in). The
/// returned flag is set if the body was being read and did not arrive in time.
pub fn limit_body(req: &mut ServiceRequest, timeout: Duration) -> Rc<Cell<bool>> {
    let expired = Rc::new(Cell::new(false));
    let payload = req.take_payload();
    if matches!(payload, Payload::None) {
        req.set_payload(payload);
        return expired;
    }
    let limited = Deadline {
        inner: payload,
        timer: Box::pin(tokio::time::sleep(timeout)),
        expired: expired.clone(),
        done: false,
    };
    req.set_payload(Payload::Stream {
        payload: Box::pin(limited),
    });
    expired
}

struct Deadline {
    inner: Payload,
    timer: Pin<Box<Sleep>>,
    expired: Rc<Cell<bool>>,
    done: bool,
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.done = true;
                    this.expired.set(true);
                    Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request body not received in time",
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_address_and_in_total() {
        let limits = ConnLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "per address");
        // The same address written as IPv4-mapped IPv6 is the same client.
        assert!(limits.admit("::ffff:192.0.2.1".parse().unwrap()).is_none());
        let _b1 = limits.admit(b).unwrap();
        assert!(limits.admit(b).is_none(), "in total");
        assert_eq!(limits.counts(), (3, 3));
        drop(a1);
        assert!(limits.admit(b).is_some(), "a place was given back");
        let unlimited = ConnLimits::new(10, 0);
        let all: Vec<_> = (0..10).map(|_| unlimited.admit(a).unwrap()).collect();
        assert!(unlimited.admit(b).is_none());
        drop(all);
        assert_eq!(unlimited.counts().0, 0);
    }
}
