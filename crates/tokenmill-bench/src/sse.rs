//! An incremental parser of `text/event-stream` bodies.
//!
//! Network reads cut a stream anywhere: in the middle of a line, between the
//! `\r` and `\n` of a line end, or inside a multi-byte UTF-8 character. The
//! parser keeps the unfinished tail as bytes and only decodes whole lines, so
//! an event is reported exactly once, when its closing blank line arrives,
//! whatever the read boundaries were. Only what the benchmark needs is kept:
//! the `data` of each event (several `data:` lines joined by `\n`); comments,
//! `event:`, `id:` and `retry:` lines are read and dropped.

/// One dispatched event: its `data`, or the reason it could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseEvent {
    /// The event's data lines, joined with `\n`.
    Data(String),
    /// A line of the event was not UTF-8; the event is unusable.
    Invalid(String),
}

/// Feeds on the body's bytes as they arrive and yields complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line not yet ended.
    partial: Vec<u8>,
    /// The last byte consumed was a `\r`: a `\n` right after it belongs to
    /// the same line end, even when it comes in the next read.
    after_cr: bool,
    /// Data lines of the event being read.
    data: Vec<String>,
    /// The event being read had a line that was not UTF-8.
    invalid: Option<String>,
    /// The event being read has at least one field (an empty event, e.g. two
    /// blank lines in a row, dispatches nothing).
    has_field: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes` and returns the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(&mut out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(&mut out);
                }
                _ => self.partial.push(b),
            }
        }
        out
    }

    /// The stream ended: an event whose closing blank line never came is
    /// still returned (servers that close right after the last `data:` line
    /// are common enough), a half line is taken as a whole one.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.partial.is_empty() {
            self.end_line(&mut out);
        }
        self.dispatch(&mut out);
        out
    }

    /// Whether bytes of an unfinished event are held (the stream stopped in
    /// the middle of one).
    pub fn has_pending(&self) -> bool {
        !self.partial.is_empty() || self.has_field
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.partial);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        let line = match String::from_utf8(line) {
            Ok(line) => line,
            Err(e) => {
                self.has_field = true;
                self.invalid
                    .get_or_insert_with(|| format!("a line is not UTF-8: {e}"));
                return;
            }
        };
        if line.starts_with(':') {
            return; // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        self.has_field = true;
        if field == "data" {
            self.data.push(value.to_owned());
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        if !std::mem::take(&mut self.has_field) {
            return;
        }
        let data = std::mem::take(&mut self.data);
        if let Some(reason) = self.invalid.take() {
            out.push(SseEvent::Invalid(reason));
        } else if !data.is_empty() {
            out.push(SseEvent::Data(data.join("\n")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent::Data(s.to_owned())
    }

    /// Feeds `body` cut at every split of `cuts` and returns all events.
    fn parse_in_pieces(body: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
            out.extend(parser.push(&body[start..cut]));
            start = cut;
        }
        out.extend(parser.finish());
        out
    }

    #[test]
    fn events_are_the_same_whatever_the_read_boundaries() {
        let body = "data: {\"a\":1}\n\ndata: {\"b\":\"é\"}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n";
        let bytes = body.as_bytes();
        let whole = parse_in_pieces(bytes, &[]);
        assert_eq!(
            whole,
            vec![data("{\"a\":1}"), data("{\"b\":\"é\"}"), data("[DONE]")]
        );
        // Every single cut point, including inside "é" and between \r and \n.
        for cut in 1..bytes.len() {
            assert_eq!(parse_in_pieces(bytes, &[cut]), whole, "cut at {cut}");
        }
        // One byte at a time.
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(parse_in_pieces(bytes, &every), whole);
    }

    #[test]
    fn multi_line_data_is_joined_and_other_fields_are_ignored() {
        let body = b"event: message\nid: 7\nretry: 10\ndata: first\ndata:second\n\n";
        assert_eq!(parse_in_pieces(body, &[]), vec![data("first\nsecond")]);
    }

    #[test]
    fn bare_carriage_returns_end_lines() {
        let body = b"data: x\r\rdata: y\r\r";
        assert_eq!(parse_in_pieces(body, &[]), vec![data("x"), data("y")]);
    }

    #[test]
    fn blank_lines_alone_dispatch_nothing() {
        assert!(parse_in_pieces(b"\n\n\n\n", &[]).is_empty());
        assert!(parse_in_pieces(b": only a comment\n\n", &[]).is_empty());
    }

    #[test]
    fn an_unterminated_last_event_is_still_returned() {
        let mut parser = SseParser::new();
        assert!(parser.push(b"data: {\"x\":1}").is_empty());
        assert!(parser.has_pending());
        assert_eq!(parser.finish(), vec![data("{\"x\":1}")]);
    }

    #[test]
    fn invalid_utf8_spoils_only_its_event() {
        let body = b"data: \xff\xfe\n\ndata: ok\n\n";
        let events = parse_in_pieces(body, &[]);
        assert_eq!(events.len(), 2);
        assert!(matches!(events[0], SseEvent::Invalid(_)));
        assert_eq!(events[1], data("ok"));
    }

    #[test]
    fn a_field_without_colon_and_empty_data() {
        // "data" alone is a data line with an empty value.
        assert_eq!(parse_in_pieces(b"data\n\n", &[]), vec![data("")]);
    }
}
