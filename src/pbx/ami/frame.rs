//! AMI framing: an incremental, byte-level parser and the frame type.
//!
//! The stream is one banner line (`Asterisk Call Manager/<version>`), then messages made of
//! `Key: Value` lines ended by an empty line. Lines end in CRLF (a bare LF is accepted too).
//! Keys may repeat (`ChanVariable`, `Variable`, `Output`) and are kept in order. A legacy
//! `Response: Follows` answer carries raw text up to `--END COMMAND--`, which may contain empty
//! lines. Everything is bounded: a line longer than [`Limits::max_line`], a frame larger than
//! [`Limits::max_frame`] or with more than [`Limits::max_fields`] fields is skipped (reported
//! as [`Item::Skipped`]) and parsing resumes at the next frame; memory stays bounded whatever
//! the peer sends.

use std::fmt;
use std::ops::Range;

/// Bounds on what one frame may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_line: usize,
    pub max_frame: usize,
    pub max_fields: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 16 * 1024,
            max_frame: 256 * 1024,
            max_fields: 1024,
        }
    }
}

const BANNER_PREFIX: &str = "Asterisk Call Manager/";
const END_COMMAND: &[u8] = b"--END COMMAND--";

/// One AMI message: ordered `Key: Value` pairs over one text buffer, plus the raw body of a
/// legacy `Response: Follows` answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    text: Box<str>,
    fields: Vec<(Range<u32>, Range<u32>)>,
    body: Option<Box<str>>,
}

impl Frame {
    /// Builds a frame from pairs (for tests and for synthesised frames).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Frame {
        let mut text = String::new();
        let mut fields = Vec::new();
        for (k, v) in pairs {
            let ks = text.len();
            text.push_str(k.as_ref());
            let ke = text.len();
            text.push_str(": ");
            let vs = text.len();
            text.push_str(v.as_ref());
            let ve = text.len();
            text.push('\n');
            fields.push((to_u32(ks)..to_u32(ke), to_u32(vs)..to_u32(ve)));
        }
        Frame {
            text: text.into_boxed_str(),
            fields,
            body: None,
        }
    }

    /// All pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.fields
            .iter()
            .map(|(k, v)| (&self.text[range(k)], &self.text[range(v)]))
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The first value of `key` (case-insensitive), as Asterisk itself reads headers.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    }

    /// Every value of a repeated key, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    }

    /// The event name, if this is an event. A frame with `Event:` is an event even when it also
    /// has `Response:` (OriginateResponse).
    pub fn event(&self) -> Option<&str> {
        self.get("Event")
    }

    /// The response status (`Success`, `Error`, `Follows`, `Goodbye`), if this is a response.
    pub fn response(&self) -> Option<&str> {
        if self.event().is_some() {
            None
        } else {
            self.get("Response")
        }
    }

    pub fn action_id(&self) -> Option<&str> {
        self.get("ActionID")
    }

    /// The raw text of a `Response: Follows` answer.
    pub fn body(&self) -> Option<&str> {
        self.body.as_deref()
    }

    /// The frame in wire form (CRLF lines, empty line at the end).
    pub fn to_wire(&self) -> String {
        let mut out = String::with_capacity(self.text.len() + self.fields.len() * 2 + 2);
        for (k, v) in self.iter() {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        if let Some(body) = &self.body {
            out.push_str(body);
        }
        out.push_str("\r\n");
        out
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in self.iter() {
            // Never print a login secret or key, even in debug logs.
            if k.eq_ignore_ascii_case("Secret") || k.eq_ignore_ascii_case("Key") {
                m.entry(&k, &"***");
            } else {
                m.entry(&k, &v);
            }
        }
        if let Some(b) = &self.body {
            m.entry(&"<body>", b);
        }
        m.finish()
    }
}

fn range(r: &Range<u32>) -> Range<usize> {
    r.start as usize..r.end as usize
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// What the parser yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The greeting line (`Asterisk Call Manager/11.0.0`).
    Banner(String),
    Frame(Frame),
    /// Bytes that could not form a frame (oversized, or no `Key: Value` line in it).
    Skipped {
        reason: String,
        bytes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Collecting `Key: Value` lines.
    Fields,
    /// Inside a `Response: Follows` body, until `--END COMMAND--`.
    Body,
    /// Dropping an oversized frame until its empty line.
    Discard,
}

/// Incremental parser: feed bytes with [`Parser::push`], take items with [`Parser::next_item`].
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the frame being built, in `buf`.
    start: usize,
    /// Where the next unread line starts, in `buf`.
    pos: usize,
    mode: Mode,
    /// Fields of the current frame, offsets relative to `start`.
    fields: Vec<(Range<u32>, Range<u32>)>,
    body: Option<Range<usize>>,
    /// The frame is a `Response: Follows` answer; `body_done` once `--END COMMAND--` was seen.
    follows: bool,
    body_done: bool,
    garbage_lines: usize,
    discard_reason: String,
    discarded: usize,
    expect_banner: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Parser::new(Limits::default())
    }
}

impl Parser {
    pub fn new(limits: Limits) -> Parser {
        Parser {
            limits,
            buf: Vec::with_capacity(16 * 1024),
            start: 0,
            pos: 0,
            mode: Mode::Fields,
            fields: Vec::new(),
            body: None,
            follows: false,
            body_done: false,
            garbage_lines: 0,
            discard_reason: String::new(),
            discarded: 0,
            expect_banner: true,
        }
    }

    /// A parser for a stream that has no banner (e.g. a capture with it stripped).
    pub fn without_banner(limits: Limits) -> Parser {
        Parser {
            expect_banner: false,
            ..Parser::new(limits)
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        // Reclaim consumed space before growing.
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.capacity() / 2)
        {
            self.buf.drain(..self.start);
            self.pos -= self.start;
            if let Some(b) = &mut self.body {
                *b = b.start - self.start..b.end - self.start;
            }
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held (for memory-bound tests).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete item, or `None` until more bytes arrive.
    pub fn next_item(&mut self) -> Option<Item> {
        loop {
            let Some(nl) = memchr::memchr(b'\n', &self.buf[self.pos..]) else {
                return self.check_partial_line();
            };
            let line_start = self.pos;
            let line_end_nl = self.pos + nl; // index of '\n'
            self.pos = line_end_nl + 1;
            let mut line_end = line_end_nl;
            if line_end > line_start && self.buf[line_end - 1] == b'\r' {
                line_end -= 1;
            }
            if line_end - line_start > self.limits.max_line && self.mode != Mode::Discard {
                self.enter_discard(format!("line longer than {} bytes", self.limits.max_line));
            }
            let empty = line_end == line_start;

            match self.mode {
                Mode::Discard => {
                    if empty {
                        let bytes = self.discarded + (self.pos - self.start);
                        let reason = std::mem::take(&mut self.discard_reason);
                        self.reset_frame();
                        return Some(Item::Skipped { reason, bytes });
                    }
                    // Keep nothing of a discarded frame.
                    self.discarded += self.pos - self.start;
                    self.start = self.pos;
                }
                Mode::Body => {
                    if let Some(body) = &mut self.body {
                        body.end = self.pos;
                    }
                    if self.buf[line_start..line_end].ends_with(END_COMMAND) {
                        self.mode = Mode::Fields;
                        self.body_done = true;
                    }
                    self.check_frame_size();
                }
                Mode::Fields => {
                    if empty {
                        if let Some(item) = self.finish_frame() {
                            return Some(item);
                        }
                        continue;
                    }
                    if self.fields.is_empty() && self.garbage_lines == 0 {
                        let line = &self.buf[line_start..line_end];
                        if self.expect_banner || line.starts_with(BANNER_PREFIX.as_bytes()) {
                            self.expect_banner = false;
                            if line.starts_with(BANNER_PREFIX.as_bytes()) || !line.contains(&b':') {
                                let banner = String::from_utf8_lossy(line).into_owned();
                                self.start = self.pos;
                                return Some(Item::Banner(banner));
                            }
                        }
                    }
                    if self.follows
                        && !self.body_done
                        && !self.is_follows_header(line_start, line_end)
                    {
                        // The raw output of a legacy Command answer starts here.
                        self.body = Some(line_start..self.pos);
                        if self.buf[line_start..line_end].ends_with(END_COMMAND) {
                            self.body_done = true;
                        } else {
                            self.mode = Mode::Body;
                        }
                    } else {
                        self.add_line(line_start, line_end);
                    }
                    self.check_frame_size();
                }
            }
        }
    }

    fn add_line(&mut self, line_start: usize, line_end: usize) {
        let line = &self.buf[line_start..line_end];
        let Some(colon) = memchr::memchr(b':', line) else {
            self.garbage_lines += 1;
            return;
        };
        if self.fields.len() >= self.limits.max_fields {
            self.enter_discard(format!("more than {} fields", self.limits.max_fields));
            return;
        }
        let key = line_start..line_start + colon;
        let mut vs = line_start + colon + 1;
        // Asterisk writes exactly one space after the colon; more is part of the value
        // (Command output keeps its indentation).
        if vs < line_end && self.buf[vs] == b' ' {
            vs += 1;
        }
        if self.fields.is_empty()
            && self.buf[key.clone()].eq_ignore_ascii_case(b"Response")
            && self.buf[vs..line_end].eq_ignore_ascii_case(b"Follows")
        {
            self.follows = true;
        }
        let rel = |r: Range<usize>| to_u32(r.start - self.start)..to_u32(r.end - self.start);
        let field = (rel(key), rel(vs..line_end));
        self.fields.push(field);
    }

    /// The headers a `Response: Follows` answer carries before its raw text.
    fn is_follows_header(&self, line_start: usize, line_end: usize) -> bool {
        let line = &self.buf[line_start..line_end];
        let Some(colon) = memchr::memchr(b':', line) else {
            return false;
        };
        let key = &line[..colon];
        key.eq_ignore_ascii_case(b"Privilege") || key.eq_ignore_ascii_case(b"ActionID")
    }

    fn check_frame_size(&mut self) {
        if self.pos - self.start > self.limits.max_frame {
            self.enter_discard(format!("frame larger than {} bytes", self.limits.max_frame));
        }
    }

    fn check_partial_line(&mut self) -> Option<Item> {
        let partial = self.buf.len() - self.pos;
        if self.mode == Mode::Discard {
            // Drop what cannot matter; keep nothing but the unread tail of this line.
            self.discarded += self.pos - self.start;
            self.start = self.pos;
            if partial > 0 {
                self.discarded += partial;
                self.pos = self.buf.len();
                self.start = self.pos;
            }
            return None;
        }
        if partial > self.limits.max_line {
            self.enter_discard(format!("line longer than {} bytes", self.limits.max_line));
            self.discarded += self.buf.len() - self.start;
            self.pos = self.buf.len();
            self.start = self.pos;
        } else if self.pos - self.start + partial > self.limits.max_frame {
            self.enter_discard(format!("frame larger than {} bytes", self.limits.max_frame));
            self.discarded += self.buf.len() - self.start;
            self.pos = self.buf.len();
            self.start = self.pos;
        }
        None
    }

    fn enter_discard(&mut self, reason: String) {
        if self.mode != Mode::Discard {
            self.mode = Mode::Discard;
            self.discard_reason = reason;
            self.discarded = 0;
            self.fields.clear();
            self.body = None;
            self.follows = false;
            self.body_done = false;
        }
    }

    fn finish_frame(&mut self) -> Option<Item> {
        let frame_end = self.pos;
        if self.fields.is_empty() {
            let bytes = frame_end - self.start;
            let garbage = self.garbage_lines;
            self.reset_frame();
            return if garbage > 0 {
                Some(Item::Skipped {
                    reason: format!("{garbage} line(s) without a key"),
                    bytes,
                })
            } else {
                // Stray empty line between frames.
                None
            };
        }
        let raw = &self.buf[self.start..frame_end];
        let (text, fields) = match std::str::from_utf8(raw) {
            // Clone (one exact-size allocation) and keep our buffer for the next frame.
            Ok(s) => (Box::<str>::from(s), self.fields.clone()),
            // Invalid UTF-8: rebuild the text pair by pair so offsets stay right.
            Err(_) => {
                let pairs: Vec<(String, String)> = self
                    .fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(&raw[range(k)]).into_owned(),
                            String::from_utf8_lossy(&raw[range(v)]).into_owned(),
                        )
                    })
                    .collect();
                let f = Frame::from_pairs(pairs);
                (f.text, f.fields)
            }
        };
        let body = self.body.take().map(|b| {
            String::from_utf8_lossy(&self.buf[b])
                .into_owned()
                .into_boxed_str()
        });
        self.reset_frame();
        Some(Item::Frame(Frame { text, fields, body }))
    }

    fn reset_frame(&mut self) {
        self.start = self.pos;
        self.mode = Mode::Fields;
        self.fields.clear();
        self.body = None;
        self.follows = false;
        self.body_done = false;
        self.garbage_lines = 0;
        self.discarded = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(p: &mut Parser, data: &[u8]) -> Vec<Item> {
        p.push(data);
        std::iter::from_fn(|| p.next_item()).collect()
    }

    fn frames(items: &[Item]) -> Vec<&Frame> {
        items
            .iter()
            .filter_map(|i| {
                if let Item::Frame(f) = i {
                    Some(f)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn banner_then_frames_with_repeated_keys() {
        let mut p = Parser::default();
        let data = b"Asterisk Call Manager/11.0.0\r\nResponse: Success\r\nActionID: 1\r\nMessage: Authentication accepted\r\n\r\n\
Event: Newchannel\r\nChanVariable: A=1\r\nChanVariable: B=2\r\nUniqueid: 17.1\r\n\r\n";
        let items = parse_all(&mut p, data);
        assert_eq!(
            items[0],
            Item::Banner("Asterisk Call Manager/11.0.0".into())
        );
        let f = frames(&items);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].response(), Some("Success"));
        assert_eq!(f[0].action_id(), Some("1"));
        assert_eq!(f[1].event(), Some("Newchannel"));
        assert_eq!(
            f[1].get_all("chanvariable").collect::<Vec<_>>(),
            vec!["A=1", "B=2"]
        );
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn originate_response_is_an_event() {
        let mut p = Parser::without_banner(Limits::default());
        let items = parse_all(
            &mut p,
            b"Event: OriginateResponse\r\nResponse: Failure\r\nReason: 3\r\n\r\n",
        );
        let f = frames(&items)[0];
        assert_eq!(f.event(), Some("OriginateResponse"));
        assert_eq!(f.response(), None);
        assert_eq!(f.get("Response"), Some("Failure"));
    }

    #[test]
    fn legacy_follows_body_may_hold_empty_lines() {
        let mut p = Parser::without_banner(Limits::default());
        let data = b"Response: Follows\r\nPrivilege: Command\r\nActionID: 7\r\nline one\n\nline three\n--END COMMAND--\r\n\r\nEvent: X\r\n\r\n";
        let items = parse_all(&mut p, data);
        let f = frames(&items);
        assert_eq!(f.len(), 2, "{items:?}");
        assert_eq!(f[0].response(), Some("Follows"));
        assert_eq!(f[0].action_id(), Some("7"));
        assert_eq!(
            f[0].body(),
            Some("line one\n\nline three\n--END COMMAND--\r\n")
        );
        assert_eq!(f[1].event(), Some("X"));
    }

    #[test]
    fn bare_lf_and_values_with_colons() {
        let mut p = Parser::without_banner(Limits::default());
        let items = parse_all(&mut p, b"Event: VarSet\nValue: a:b: c\nEmpty:\n\n");
        let f = frames(&items)[0];
        assert_eq!(f.get("Value"), Some("a:b: c"));
        assert_eq!(f.get("Empty"), Some(""));
    }

    #[test]
    fn oversized_lines_and_frames_are_skipped_and_parsing_resumes() {
        let limits = Limits {
            max_line: 64,
            max_frame: 256,
            max_fields: 8,
        };
        let mut p = Parser::new(limits);
        let mut data = b"Asterisk Call Manager/11.0.0\r\n".to_vec();
        data.extend_from_slice(b"Event: Big\r\nValue: ");
        data.extend(std::iter::repeat_n(b'x', 1000));
        data.extend_from_slice(b"\r\n\r\nEvent: Ok1\r\n\r\n");
        for i in 0..20 {
            data.extend_from_slice(format!("K{i}: v\r\n").as_bytes());
        }
        data.extend_from_slice(b"\r\nEvent: Ok2\r\n\r\n");
        let items = parse_all(&mut p, &data);
        let skipped = items
            .iter()
            .filter(|i| matches!(i, Item::Skipped { .. }))
            .count();
        let names: Vec<_> = frames(&items)
            .iter()
            .map(|f| f.event().unwrap().to_string())
            .collect();
        assert_eq!(skipped, 2, "{items:?}");
        assert_eq!(names, vec!["Ok1", "Ok2"]);
    }

    #[test]
    fn an_endless_line_does_not_grow_the_buffer() {
        let limits = Limits {
            max_line: 1024,
            max_frame: 4096,
            max_fields: 64,
        };
        let mut p = Parser::without_banner(limits);
        for _ in 0..10_000 {
            p.push(&[b'y'; 100]);
            assert!(p.next_item().is_none());
            assert!(p.buffered() <= 4096 + 100, "{}", p.buffered());
        }
        p.push(b"\r\n\r\nEvent: After\r\n\r\n");
        let items: Vec<Item> = std::iter::from_fn(|| p.next_item()).collect();
        assert!(matches!(items[0], Item::Skipped { .. }));
        assert_eq!(frames(&items)[0].event(), Some("After"));
    }

    #[test]
    fn garbage_without_keys_is_reported() {
        let mut p = Parser::without_banner(Limits::default());
        let items = parse_all(
            &mut p,
            b"\x00\x01 garbage\r\nmore garbage\r\n\r\nEvent: Fine\r\n\r\n",
        );
        assert!(matches!(items[0], Item::Skipped { .. }), "{items:?}");
        assert_eq!(frames(&items)[0].event(), Some("Fine"));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let mut p = Parser::without_banner(Limits::default());
        let items = parse_all(
            &mut p,
            b"Event: Newchannel\r\nCallerIDName: \xff\xfeBob\r\n\r\n",
        );
        assert_eq!(
            frames(&items)[0].get("CallerIDName"),
            Some("\u{FFFD}\u{FFFD}Bob")
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let f = Frame::from_pairs([("Action", "Login"), ("Secret", "hunter2"), ("Key", "abcd")]);
        let s = format!("{f:?}");
        assert!(!s.contains("hunter2") && !s.contains("abcd"), "{s}");
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> Limits {
        Limits {
            max_line: 256,
            max_frame: 2048,
            max_fields: 32,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes in arbitrary chunks: no panic, and the buffer never holds much more
        /// than one frame's worth.
        #[test]
        fn arbitrary_bytes_never_panic_nor_grow_unbounded(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..64)
        ) {
            let limits = small();
            let mut p = Parser::new(limits);
            for c in &chunks {
                p.push(c);
                while p.next_item().is_some() {}
                prop_assert!(p.buffered() <= limits.max_frame + limits.max_line + 512 + 2, "{}", p.buffered());
            }
        }

        /// Bytes that look like AMI (keys, colons, CR/LF in odd places) parse the same whole or split.
        #[test]
        fn split_points_do_not_change_the_result(
            parts in proptest::collection::vec(prop_oneof![
                Just(b"Event: X\r\n".to_vec()), Just(b"Key: v\r\n".to_vec()), Just(b"\r\n".to_vec()),
                Just(b"\n".to_vec()), Just(b"Response: Follows\r\n".to_vec()), Just(b"--END COMMAND--\r\n".to_vec()),
                Just(b"junk".to_vec()), Just(b":".to_vec()), Just(b"\r".to_vec()),
            ], 0..80),
            split in 1usize..17,
        ) {
            let data: Vec<u8> = parts.concat();
            let mut whole = Parser::new(small());
            whole.push(&data);
            let a: Vec<Item> = std::iter::from_fn(|| whole.next_item()).collect();
            let mut pieces = Parser::new(small());
            let mut b = Vec::new();
            for c in data.chunks(split) {
                pieces.push(c);
                b.extend(std::iter::from_fn(|| pieces.next_item()));
            }
            prop_assert_eq!(a, b);
        }
    }
}
