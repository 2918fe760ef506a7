//! What a request sends upstream, and the copy of its body kept so that it can be sent again
//! on another endpoint. A body is copied only while a replay is possible (another endpoint
//! exists) and only up to the route's limit ([`MAX_REPLAY_BODY`] by default); the copy shares the body's buffers (`Bytes`),
//! so it costs no byte copying, only references.
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// The largest request body kept for a replay unless the route says otherwise; a larger one
/// is sent once.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

/// A request body on its way upstream.
pub enum UpBody {
    /// The client's body, as it arrives.
    Streamed(ClientBody),
    /// The client's body, as it arrives, copied into `copy` while it fits.
    Copied {
        body: ClientBody,
        copy: BodyCopy,
    },
    /// A complete copy, sent again.
    Replayed(VecDeque<Bytes>),
    Empty,
}

/// The client's request body, counting the bytes it delivers into `received` when the request
/// is recorded beyond metrics (its access log line, span or tap event shows them).
pub struct ClientBody {
    inner: Incoming,
    received: Option<Arc<AtomicU64>>,
}

impl ClientBody {
    pub fn new(inner: Incoming, received: Option<Arc<AtomicU64>>) -> ClientBody {
        ClientBody { inner, received }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(received), Poll::Ready(Some(Ok(frame)))) = (&this.received, &polled)
            && let Some(data) = frame.data_ref()
        {
            received.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The copy of a request body, filled while the body is sent.
#[derive(Clone)]
pub struct BodyCopy(Arc<Mutex<Copy>>);

struct Copy {
    chunks: Vec<Bytes>,
    len: usize,
    /// The most kept.
    limit: usize,
    /// The body ended and every byte of it is in `chunks`.
    complete: bool,
    /// Too large, had trailers, or failed: no replay.
    spoiled: bool,
}

impl BodyCopy {
    fn with<R>(&self, f: impl FnOnce(&mut Copy) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn new(limit: usize) -> BodyCopy {
        BodyCopy(Arc::new(Mutex::new(Copy { chunks: Vec::new(), len: 0, limit, complete: false, spoiled: false })))
    }

    /// The whole body again, if it was sent to the end and kept.
    pub fn replay(&self) -> Option<UpBody> {
        self.with(|c| (c.complete && !c.spoiled).then(|| UpBody::Replayed(c.chunks.iter().cloned().collect())))
    }
}

impl UpBody {
    /// Whether a body of this size hint can be kept for a replay of at most `limit` bytes.
    pub fn fits(hint: &SizeHint, limit: usize) -> bool {
        hint.upper().is_none_or(|n| n <= limit as u64)
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            UpBody::Copied { body, copy } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(r) = &polled {
                    // hyper stops polling once `is_end_stream` says the body is done, so the
                    // end is noted with the last frame, not only on `None`.
                    let ended = body.is_end_stream();
                    copy.with(|c| match r {
                        Some(Ok(frame)) => match frame.data_ref() {
                            Some(data) if !c.spoiled && c.len + data.len() <= c.limit => {
                                c.len += data.len();
                                c.chunks.push(data.clone());
                                c.complete = ended;
                            }
                            _ => {
                                c.spoiled = true;
                                c.chunks = Vec::new();
                            }
                        },
                        Some(Err(_)) => c.spoiled = true,
                        None => c.complete = true,
                    });
                }
                polled
            }
            UpBody::Replayed(chunks) => Poll::Ready(chunks.pop_front().map(|d| Ok(Frame::data(d)))),
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Streamed(b) | UpBody::Copied { body: b, .. } => b.is_end_stream(),
            UpBody::Replayed(chunks) => chunks.is_empty(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Streamed(b) | UpBody::Copied { body: b, .. } => b.size_hint(),
            UpBody::Replayed(chunks) => SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum()),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}
