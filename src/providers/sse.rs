//! Incremental Server-Sent Events parser (the subset LLM providers use: `event:` and
//! `data:` fields, blank-line terminated). Pure: bytes in, events out.

/// One dispatched event. `event` is empty when the server sent no `event:` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; returns the events it completed. A chunk may end mid-line or even
    /// mid-UTF-8 sequence, so bytes are buffered until a newline.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut consumed = 0;
        while let Some(pos) = self.buffer[consumed..].iter().position(|&b| b == b'\n') {
            let line_end = consumed + pos;
            let mut line = &self.buffer[consumed..line_end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            consumed = line_end + 1;
            if let Some(event) = self.process_line(&line) {
                events.push(event);
            }
        }
        self.buffer.drain(..consumed);
        events
    }

    /// True when bytes of an unfinished line or event are pending (a cut stream).
    pub fn has_pending(&self) -> bool {
        !self.buffer.is_empty() || self.has_data
    }

    fn process_line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if !self.has_data {
                self.event.clear();
                return None;
            }
            self.has_data = false;
            return Some(SseEvent { event: std::mem::take(&mut self.event), data: std::mem::take(&mut self.data) });
        }
        if line.starts_with(':') {
            return None; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = SseParser::new();
        assert!(p.push(b"event: message_start\nda").is_empty());
        let ev = p.push(b"ta: {\"a\":1}\r\n\r\n: ping\n\ndata: x\ndata: y\n\n");
        assert_eq!(
            ev,
            vec![
                SseEvent { event: "message_start".into(), data: "{\"a\":1}".into() },
                SseEvent { event: String::new(), data: "x\ny".into() },
            ]
        );
        assert!(!p.has_pending());
        p.push(b"data: [DO");
        assert!(p.has_pending());
    }
}
