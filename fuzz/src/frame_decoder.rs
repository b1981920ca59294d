//! The frame decoder check: the agent protocol's frame decoder and message
//! parsers, fed the bytes a hostile sandbox could send the host (or a host
//! the agent).
//!
//! The buffered decoder (`Frame::decode`) and the blocking reader
//! (`read_frame`, whose `parse_len` + `decode_body` the host-side client also
//! uses) must agree frame by frame, every decoded frame must re-encode to
//! exactly the bytes it came from, and no payload may make a parser panic.

use std::io::{Cursor, ErrorKind};

use stacyvm_agent::protocol::{
    read_frame, AgentInfo, EntryBatch, ExitFrame, Frame, Hello, Kind, PathBatch, ReadError,
    Request, HEADER_LEN, MAX_FRAME_LEN,
};
use stacyvm_core::error::WireError;

/// How the buffered decoder stopped.
enum Stop {
    /// All bytes were used by whole frames.
    Clean,
    /// A partial frame is left over.
    Partial,
    /// The bytes are not a frame.
    Refused,
}

/// Checks one input; panics on a finding.
pub fn check(data: &[u8]) {
    let mut frames = Vec::new();
    let mut rest = data;
    let stop = loop {
        match Frame::decode(rest) {
            Ok(Some((frame, used))) => {
                assert!(
                    (4 + HEADER_LEN..=4 + MAX_FRAME_LEN).contains(&used) && used <= rest.len(),
                    "decode used {used} of {} bytes",
                    rest.len()
                );
                assert_eq!(
                    frame.encode(),
                    &rest[..used],
                    "a decoded frame re-encodes to the bytes it came from"
                );
                rest = &rest[used..];
                frames.push(frame);
            }
            Ok(None) if rest.is_empty() => break Stop::Clean,
            Ok(None) => break Stop::Partial,
            Err(_) => break Stop::Refused,
        }
    };

    let mut reader = Cursor::new(data);
    for expected in &frames {
        match read_frame(&mut reader) {
            Ok(frame) => assert_eq!(&frame, expected, "read_frame and decode disagree"),
            Err(e) => panic!("read_frame refused a frame decode accepted ({expected:?}): {e}"),
        }
    }
    match (stop, read_frame(&mut reader)) {
        (Stop::Clean, Err(ReadError::Closed)) => {}
        (Stop::Partial, Err(ReadError::Io(e))) if e.kind() == ErrorKind::UnexpectedEof => {}
        (Stop::Refused, Err(ReadError::Protocol(_))) => {}
        (_, other) => panic!(
            "read_frame ends differently from decode: {:?}",
            other.map(|f| format!("{f:?}")).map_err(|e| e.to_string())
        ),
    }

    for frame in &frames {
        parse_payload(frame);
    }
}

/// Parses a payload as what its kind carries; a parsed request must survive
/// a serialise/parse round trip unchanged.
fn parse_payload(frame: &Frame) {
    match frame.kind {
        Kind::Hello => {
            let _ = frame.parse::<Hello>();
        }
        Kind::HelloOk | Kind::Ok => {
            let _ = frame.parse::<AgentInfo>();
            let _ = frame.parse::<stacyvm_core::FileEntry>();
        }
        Kind::Request => {
            if let Ok(req) = frame.parse::<Request>() {
                let again = Frame::json(frame.id, Kind::Request, &req);
                let back: Request = again.parse().expect("a request we serialised parses back");
                assert_eq!(back, req, "a request survives a round trip");
                let _ = req.has_upload();
            }
        }
        Kind::Error => {
            let _ = frame.parse::<WireError>();
        }
        Kind::Exit => {
            let _ = frame.parse::<ExitFrame>();
        }
        Kind::Data => {
            let _ = frame.parse::<EntryBatch>();
            let _ = frame.parse::<PathBatch>();
        }
        Kind::Credit => {
            let _ = frame.credit_count();
        }
        Kind::Stdout | Kind::Stderr | Kind::End | Kind::Cancel => {}
    }
}
