//! gRPC's length-prefixed messages (1 byte compressed flag, 4 bytes big-endian length,
//! the message), found in a body as its chunks pass. The chunks themselves are forwarded
//! unchanged; the splitter only counts messages and, when asked, keeps a copy of each
//! message for a tap.

use bytes::{Bytes, BytesMut};

/// One complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender compressed it with the call's `grpc-encoding`.
    pub compressed: bool,
    /// The message bytes when the splitter keeps messages and it was not larger than the
    /// limit; `None` otherwise.
    pub bytes_opt: Option<Bytes>,
}

/// Splits chunks into messages; messages may span chunks and chunks may hold many.
pub struct FrameSplitter {
    header: [u8; 5],
    header_filled: usize,
    /// Bytes of the current message still to come (0 between messages).
    remaining: usize,
    compressed: bool,
    /// Copies messages out for a tap; off for calls nobody reads.
    keep: bool,
    /// A kept message larger than this is counted but not copied.
    max_kept_bytes: usize,
    current: Option<BytesMut>,
}

impl FrameSplitter {
    pub fn new(keep: bool, max_kept_bytes: usize) -> FrameSplitter {
        FrameSplitter {
            header: [0; 5],
            header_filled: 0,
            remaining: 0,
            compressed: false,
            keep,
            max_kept_bytes,
            current: None,
        }
    }

    /// Feeds one chunk; calls `on_message` for each message it completes.
    pub fn push(&mut self, mut chunk: &[u8], mut on_message: impl FnMut(Message)) {
        while !chunk.is_empty() {
            if self.header_filled < 5 {
                let take = (5 - self.header_filled).min(chunk.len());
                self.header[self.header_filled..self.header_filled + take]
                    .copy_from_slice(&chunk[..take]);
                self.header_filled += take;
                chunk = &chunk[take..];
                if self.header_filled < 5 {
                    return;
                }
                self.compressed = self.header[0] == 1;
                self.remaining = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.current = (self.keep && self.remaining <= self.max_kept_bytes)
                    .then(|| BytesMut::with_capacity(self.remaining));
                if self.remaining == 0 {
                    self.finish(&mut on_message);
                }
                continue;
            }
            let take = self.remaining.min(chunk.len());
            if let Some(current) = self.current.as_mut() {
                current.extend_from_slice(&chunk[..take]);
            }
            self.remaining -= take;
            chunk = &chunk[take..];
            if self.remaining == 0 {
                self.finish(&mut on_message);
            }
        }
    }

    fn finish(&mut self, on_message: &mut impl FnMut(Message)) {
        self.header_filled = 0;
        on_message(Message {
            compressed: self.compressed,
            bytes_opt: self.current.take().map(BytesMut::freeze),
        });
    }

    /// True when the body ended between messages (a cut-off message is not counted).
    pub fn at_boundary(&self) -> bool {
        self.header_filled == 0
    }
}

/// One message framed for a gRPC body.
pub fn frame(compressed: bool, message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.extend_from_slice(&[u8::from(compressed)]);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], keep: bool, max: usize) -> (Vec<Message>, bool) {
        let mut splitter = FrameSplitter::new(keep, max);
        let mut messages = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, |message| messages.push(message));
        }
        (messages, splitter.at_boundary())
    }

    #[test]
    fn test_frames_split_across_and_within_chunks() {
        let mut body = Vec::new();
        body.extend_from_slice(&frame(false, b"hello"));
        body.extend_from_slice(&frame(false, b""));
        body.extend_from_slice(&frame(true, b"world!"));
        // Every way of cutting the body into two chunks finds the same three messages.
        for cut in 0..=body.len() {
            let (messages, boundary) = split(&[&body[..cut], &body[cut..]], true, 1024);
            assert!(boundary);
            assert_eq!(messages.len(), 3, "cut at {cut}");
            assert_eq!(messages[0].bytes_opt.as_deref(), Some(&b"hello"[..]));
            assert_eq!(messages[1].bytes_opt.as_deref(), Some(&b""[..]));
            assert!(messages[2].compressed);
            assert_eq!(messages[2].bytes_opt.as_deref(), Some(&b"world!"[..]));
        }
        // One byte at a time.
        let chunks: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(split(&chunks, true, 1024).0.len(), 3);
    }

    #[test]
    fn test_frames_count_without_keeping_and_skip_oversized() {
        let mut body = Vec::new();
        body.extend_from_slice(&frame(false, &[7; 100]));
        body.extend_from_slice(&frame(false, b"ok"));
        let (messages, _) = split(&[&body], false, 1024);
        assert_eq!(messages.len(), 2);
        assert!(messages.iter().all(|message| message.bytes_opt.is_none()));
        let (messages, _) = split(&[&body], true, 10);
        assert_eq!(
            messages[0].bytes_opt, None,
            "larger than the limit: counted only"
        );
        assert_eq!(messages[1].bytes_opt.as_deref(), Some(&b"ok"[..]));
    }

    #[test]
    fn test_frames_cut_off_message_is_not_counted() {
        let body = frame(false, b"truncated");
        let (messages, boundary) = split(&[&body[..8]], true, 1024);
        assert!(messages.is_empty());
        assert!(!boundary);
    }
}
