//! The receiving end of a byte stream the client uploads (stdin, file
//! contents): frames arrive through a bounded queue filled by the
//! connection's reader, and credit goes back as they are consumed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::flow::Out;

/// One item of an upload.
#[derive(Debug)]
pub enum Upload {
    Data(Vec<u8>),
    End,
}

/// The handler's side of an upload.
pub struct UploadRx {
    rx: Receiver<Upload>,
    /// Shared with the connection's reader, which checks the client keeps
    /// within it.
    budget: Arc<AtomicU32>,
    consumed: u32,
    /// The connection's credit window, in chunks.
    window: u32,
    ended: bool,
}

impl UploadRx {
    pub fn new(rx: Receiver<Upload>, budget: Arc<AtomicU32>, window: u32) -> UploadRx {
        UploadRx {
            rx,
            budget,
            consumed: 0,
            window,
            ended: false,
        }
    }

    /// The next item; `None` when the request was cancelled or the
    /// connection is gone (the queue's sender was dropped before `End`).
    pub fn next(&mut self, out: &Out) -> Option<Upload> {
        if self.ended {
            return None;
        }
        match self.rx.recv() {
            Ok(Upload::Data(d)) => {
                self.consumed += 1;
                // Credit in batches to halve the frames going back.
                if self.consumed >= self.window / 2 {
                    // The budget grows before the client can learn of it.
                    self.budget.fetch_add(self.consumed, Ordering::SeqCst);
                    out.credit(self.consumed);
                    self.consumed = 0;
                }
                Some(Upload::Data(d))
            }
            Ok(Upload::End) => {
                self.ended = true;
                Some(Upload::End)
            }
            Err(_) => None,
        }
    }
}

/// An upload read as a byte stream (for the tar reader). Reading past the
/// client's `End` gives end of file; a cancelled upload gives an error.
pub struct UploadReader<'a> {
    up: UploadRx,
    out: &'a Out,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
    cancelled: bool,
}

impl<'a> UploadReader<'a> {
    pub fn new(up: UploadRx, out: &'a Out) -> UploadReader<'a> {
        UploadReader {
            up,
            out,
            chunk: Vec::new(),
            pos: 0,
            ended: false,
            cancelled: false,
        }
    }

    /// Whether the client cancelled the upload.
    pub fn cancelled(&self) -> bool {
        self.cancelled
    }
}

impl std::io::Read for UploadReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            if self.cancelled {
                return Err(std::io::Error::other("the upload was cancelled"));
            }
            match self.up.next(self.out) {
                Some(Upload::Data(d)) => {
                    self.chunk = d;
                    self.pos = 0;
                }
                Some(Upload::End) => self.ended = true,
                None => self.cancelled = true,
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
