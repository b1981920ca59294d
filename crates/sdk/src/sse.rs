//! A small Server-Sent Events reader: turns a byte stream into
//! `(event, data)` pairs as each one completes, holding at most one event
//! in memory.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// One complete event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// `message` when the server named none.
    pub event: String,
    pub data: String,
}

/// Incremental parser state; feed it bytes, take events out.
#[derive(Default)]
pub(crate) struct SseParser {
    buf: BytesMut,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event in what was fed so far.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buf.iter().position(|&b| b == b'\n')?;
            let mut line = self.buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    let event = self.event.take().unwrap_or_else(|| "message".to_owned());
                    return Some(SseEvent { event, data });
                }
                self.event = None;
                continue;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.event = Some(value),
                "data" => match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&value);
                    }
                    None => self.data = Some(value),
                },
                _ => {}
            }
        }
    }
}

/// The events of an SSE byte stream. A transport error ends the stream
/// with that error.
pub(crate) fn events<S, E>(body: S) -> impl Stream<Item = Result<SseEvent, E>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Send,
{
    futures_util::stream::unfold(
        (body, SseParser::default(), false),
        |(mut body, mut parser, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(ev) = parser.next_event() {
                    return Some((Ok(ev), (body, parser, false)));
                }
                match body.next().await {
                    Some(Ok(mut chunk)) => {
                        let bytes = chunk.copy_to_bytes(chunk.remaining());
                        parser.feed(&bytes);
                    }
                    Some(Err(e)) => return Some((Err(e), (body, parser, true))),
                    None => return None,
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for chunk in input {
            p.feed(chunk);
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        out
    }

    #[test]
    fn events_split_across_chunks_come_out_whole() {
        let got = all(&[
            b"event: std",
            b"out\ndata: {\"data\":",
            b"\"hi\"}\n",
            b"\n",
            b"event: exit\ndata: {}\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                SseEvent {
                    event: "stdout".into(),
                    data: "{\"data\":\"hi\"}".into()
                },
                SseEvent {
                    event: "exit".into(),
                    data: "{}".into()
                },
            ]
        );
    }

    #[test]
    fn comments_crlf_and_multiline_data() {
        let got =
            all(&[b": keep-alive\r\n\r\nevent: log\r\ndata: a\r\ndata: b\r\n\r\ndata: plain\n\n"]);
        assert_eq!(
            got,
            vec![
                SseEvent {
                    event: "log".into(),
                    data: "a\nb".into()
                },
                SseEvent {
                    event: "message".into(),
                    data: "plain".into()
                },
            ]
        );
    }

    #[test]
    fn an_unfinished_event_is_not_emitted() {
        assert!(all(&[b"event: stdout\ndata: x\n"]).is_empty());
    }
}
