//! `GET`/`HEAD /records/{token}.{ext}`: serves a recording like a static file server.
//!
//! `Content-Type` from the file's first bytes, `Content-Length`, `Accept-Ranges: bytes`, one
//! byte range per request (206 with `Content-Range`; 416 when unsatisfiable; several ranges are
//! answered with the whole file, as RFC 9110 allows), a strong `ETag` and `Last-Modified` with
//! `If-None-Match`/`If-Modified-Since` (304) and `If-Range`, `Content-Disposition: inline`, and
//! `Access-Control-Allow-Origin: *` so that the CRM's page may play it directly.
//!
//! Which file, whether the link is good, and the `Range` grammar are [`crate::records::serve`]'s;
//! this is the HTTP half: headers, conditional requests, the streamed body.
//!
//! The body is streamed in [`CHUNK`]-sized reads, one in flight per response: memory stays flat
//! whatever the file's size. Reads of data in the page cache are done in place (`preadv2` with
//! `RWF_NOWAIT`, which never waits for the disk); a read that would wait goes to tokio's
//! blocking pool, so a slow disk never stalls the server's threads.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header::{
    self, ContentDisposition, DispositionParam, DispositionType, EntityTag, HeaderValue, HttpDate,
    IfNoneMatch, IfRange,
};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, HttpResponseBuilder, ResponseError};

use crate::http::{ApiError, AppState};
use crate::metrics::Metrics;
use crate::records::serve::{self, parse_range, Opened, Range, ServeError};
use crate::store::unix_now;

/// Bytes per read, and the server's write buffer size. actix-web copies each chunk into its
/// per-connection write buffer before writing it out, so larger chunks only add memory per
/// connection: measured at 50 clients, 64 KiB chunks gave the same throughput with three times
/// the RSS growth.
pub const CHUNK: usize = 16 * 1024;

/// The handler for both methods.
pub async fn recording(
    req: HttpRequest,
    name: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    // `{token}.{ext}`: the extension is signed along with the token.
    let name = name.into_inner();
    let records = state.records.clone();
    let opened = match web::block(move || serve::open(&records, &name, unix_now())).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return error(e.into()),
        Err(e) => return error(ApiError::internal(format!("opening the recording: {e}"))),
    };
    respond(&req, opened, &state.metrics)
}

fn error(e: ApiError) -> HttpResponse {
    let mut res = e.error_response();
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    res
}

fn respond(req: &HttpRequest, f: Opened, metrics: &Arc<Metrics>) -> HttpResponse {
    let etag = EntityTag::new_strong(f.etag.clone());
    let last_modified = f.modified.map(|t| HttpDate::from(t).to_string());
    let headers = |status: StatusCode| {
        let mut b = HttpResponseBuilder::new(status);
        b.insert_header((header::ETAG, etag.to_string()));
        if let Some(date) = &last_modified {
            b.insert_header((header::LAST_MODIFIED, date.as_str()));
        }
        b.insert_header((header::ACCEPT_RANGES, "bytes"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
            .insert_header((
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                "Content-Length, Content-Range, Accept-Ranges, ETag",
            ))
            .insert_header((header::CACHE_CONTROL, "private, max-age=3600"))
            .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
        b
    };

    if not_modified(req, &etag, f.modified) {
        return headers(StatusCode::NOT_MODIFIED).finish();
    }

    let range = match req.headers().get(header::RANGE) {
        Some(value) if range_applies(req, &etag, f.modified) => {
            parse_range(value.to_str().unwrap_or_default(), f.len)
        }
        _ => Range::Full,
    };
    let (status, start, end) = match range {
        Range::Full => (StatusCode::OK, 0, f.len),
        Range::Partial(start, end) => (StatusCode::PARTIAL_CONTENT, start, end),
        Range::Unsatisfiable => {
            let mut res = error(ServeError::RangeNotSatisfiable { len: f.len }.into());
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", f.len)) {
                res.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return res;
        }
    };

    let mut b = headers(status);
    b.content_type(f.format.content_type())
        .insert_header(ContentDisposition {
            disposition: DispositionType::Inline,
            parameters: vec![DispositionParam::Filename(f.filename.clone())],
        });
    if status == StatusCode::PARTIAL_CONTENT {
        b.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{}", end - 1, f.len),
        ));
    }
    let head_only = req.method() == actix_web::http::Method::HEAD;
    b.body(FileBody::new(f.file, start, end, head_only).counted_in(metrics.clone()))
}

/// `If-None-Match` (weak comparison, `*` matches), else `If-Modified-Since` (whole seconds; never
/// without a `Last-Modified`).
fn not_modified(req: &HttpRequest, etag: &EntityTag, modified: Option<SystemTime>) -> bool {
    if req.headers().contains_key(header::IF_NONE_MATCH) {
        return match req.get_header::<IfNoneMatch>() {
            Some(IfNoneMatch::Any) => true,
            Some(IfNoneMatch::Items(tags)) => tags.iter().any(|t| t.weak_eq(etag)),
            None => false,
        };
    }
    let Some(modified) = modified else {
        return false;
    };
    let since = req
        .headers()
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<HttpDate>().ok())
        .map(SystemTime::from);
    match since {
        Some(since) => whole_seconds(modified) <= whole_seconds(since),
        None => false,
    }
}

/// A `Range` counts unless `If-Range` names another version (strong comparison, exact date; a
/// date never matches a file without a `Last-Modified`).
fn range_applies(req: &HttpRequest, etag: &EntityTag, modified: Option<SystemTime>) -> bool {
    if !req.headers().contains_key(header::IF_RANGE) {
        return true;
    }
    match req.get_header::<IfRange>() {
        Some(IfRange::EntityTag(tag)) => tag.strong_eq(etag),
        Some(IfRange::Date(date)) => modified.is_some_and(|modified| {
            whole_seconds(SystemTime::from(date)) == whole_seconds(modified)
        }),
        None => false,
    }
}

fn whole_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// The response body: bytes `pos..end` of the file, read one chunk at a time, only as fast as
/// the client takes them. `HEAD` answers have the size but never read.
pub struct FileBody {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
    size: u64,
    reading: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
    /// Whether to try reading from the page cache in place first.
    nowait: bool,
    /// Where the bytes sent are counted.
    served: Option<Arc<Metrics>>,
}

impl FileBody {
    pub fn new(file: std::fs::File, start: u64, end: u64, head_only: bool) -> FileBody {
        FileBody {
            file: Arc::new(file),
            pos: if head_only { end } else { start },
            end,
            size: end - start,
            reading: None,
            nowait: cfg!(all(target_os = "linux", target_env = "gnu")),
            served: None,
        }
    }

    /// Counts the bytes sent in `metrics`.
    pub fn counted_in(mut self, metrics: Arc<Metrics>) -> FileBody {
        self.served = Some(metrics);
        self
    }

    fn take(&mut self, chunk: Bytes) -> io::Result<Bytes> {
        if chunk.is_empty() {
            // The file got shorter than the length already announced: abort the response.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the recording got shorter while it was being sent",
            ));
        }
        self.pos += chunk.len() as u64;
        if let Some(metrics) = &self.served {
            metrics.record_bytes_served(chunk.len() as u64);
        }
        Ok(chunk)
    }
}

impl MessageBody for FileBody {
    type Error = io::Error;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.size)
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        if let Some(task) = this.reading.as_mut() {
            let result = ready!(Pin::new(task).poll(cx));
            this.reading = None;
            return Poll::Ready(Some(match result {
                Ok(Ok(chunk)) => this.take(chunk),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(io::Error::other(e)),
            }));
        }
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.end - this.pos)
            .unwrap_or(CHUNK)
            .min(CHUNK);
        if this.nowait {
            match read_cached(&this.file, this.pos, want) {
                Ok(chunk) => return Poll::Ready(Some(this.take(chunk))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Not supported here (kernel, file system): always use the blocking pool.
                Err(_) => this.nowait = false,
            }
        }
        let file = this.file.clone();
        let pos = this.pos;
        let mut task = tokio::task::spawn_blocking(move || read_chunk(&file, pos, want));
        match Pin::new(&mut task).poll(cx) {
            Poll::Ready(result) => Poll::Ready(Some(match result {
                Ok(Ok(chunk)) => this.take(chunk),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(io::Error::other(e)),
            })),
            Poll::Pending => {
                this.reading = Some(task);
                Poll::Pending
            }
        }
    }
}

/// Reads up to `want` bytes at `pos`, waiting for the disk if needed (blocking pool only).
fn read_chunk(file: &std::fs::File, pos: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(want);
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..], pos + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf.freeze())
}

/// Reads what the page cache holds at `pos` (up to `want` bytes) without waiting for the disk;
/// `WouldBlock` when nothing there is cached.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn read_cached(file: &std::fs::File, pos: u64, want: usize) -> io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let offset =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = BytesMut::with_capacity(want);
    let iov = libc::iovec {
        iov_base: buf.spare_capacity_mut().as_mut_ptr().cast(),
        iov_len: want,
    };
    // SAFETY: the iovec points at `want` bytes of `buf`'s spare capacity, which outlives the
    // call; the kernel writes at most `iov_len` bytes there.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised the first `n` (≤ want) bytes.
    unsafe { buf.set_len(n as usize) };
    Ok(buf.freeze())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn read_cached(_file: &std::fs::File, _pos: u64, _want: usize) -> io::Result<Bytes> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::serve::{http_date_can_express, LAST_HTTP_DATE_SECS};

    #[test]
    fn only_mtimes_an_http_date_can_express_are_sent() {
        let last = UNIX_EPOCH + Duration::from_secs(LAST_HTTP_DATE_SECS);
        assert!(http_date_can_express(UNIX_EPOCH));
        assert!(http_date_can_express(last + Duration::from_millis(999)));
        assert!(!http_date_can_express(last + Duration::from_secs(1)));
        assert!(!http_date_can_express(UNIX_EPOCH - Duration::from_nanos(1)));
        // The bounds format without panicking.
        assert_eq!(
            HttpDate::from(last + Duration::from_millis(999)).to_string(),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
        assert_eq!(
            HttpDate::from(UNIX_EPOCH).to_string(),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }

    #[test]
    fn cached_reads_return_the_bytes_at_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let chunk = read_chunk(&file, 70_000, CHUNK).unwrap();
        assert_eq!(&chunk[..], &data[70_000..70_000 + CHUNK]);
        // Just written, so cached: the in-place read works (or is unsupported here).
        match read_cached(&file, 199_990, CHUNK) {
            Ok(c) => assert_eq!(&c[..], &data[199_990..]),
            Err(e) => assert!(e.kind() != io::ErrorKind::Other, "{e}"),
        }
        assert!(read_chunk(&file, 200_000, 10).unwrap().is_empty());
    }
}
