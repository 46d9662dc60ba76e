//! A session's kept output: the newest bytes, in the order printed,
//! each chunk tagged with its stream.
//!
//! ```text
//!   total printed ──────────────────────────────────────────────> now
//!   |<── dropped ──>|<────────── kept (at most `cap`) ─────────>|
//!                   start                                       total
//! ```
//!
//! Positions are absolute byte offsets into everything the session
//! printed, so a reader keeps one number (its cursor) and asks for
//! what came after it; a cursor that fell behind `start` has lost
//! output, which the reader is told instead of being handed a gap.

use std::collections::VecDeque;

use bytes::Bytes;
use cellvm_wire::frame::Stream;

/// One piece of output as it was read.
#[derive(Debug, Clone)]
struct Chunk {
    /// Offset of its first byte in all output.
    at: u64,
    stream: Stream,
    data: Bytes,
}

/// The newest `cap` bytes of a session's output.
#[derive(Debug)]
pub(crate) struct Ring {
    chunks: VecDeque<Chunk>,
    kept: usize,
    total: u64,
    cap: usize,
}

/// What a reader gets: the chunks after its cursor, and where it
/// stands after them.
pub(crate) type Since = (Vec<(Stream, Bytes)>, u64);

/// Joins neighbouring chunks of one stream into pieces of at most
/// `max` bytes, one piece at a time (so the first goes out before the
/// rest is copied): a program writing a line at a time leaves
/// thousands of small chunks, which would otherwise travel as as many
/// frames (and WebSocket messages).
pub(crate) struct Pieces {
    chunks: std::vec::IntoIter<(Stream, Bytes)>,
    next: Option<(Stream, Bytes)>,
    max: usize,
}

impl Pieces {
    pub(crate) fn new(chunks: Vec<(Stream, Bytes)>, max: usize) -> Self {
        Self { chunks: chunks.into_iter(), next: None, max }
    }
}

impl Iterator for Pieces {
    type Item = (Stream, Bytes);

    fn next(&mut self) -> Option<(Stream, Bytes)> {
        let (stream, first) =
            self.next.take().or_else(|| self.chunks.next())?;
        if first.len() >= self.max {
            return Some((stream, first));
        }
        let mut piece: Option<bytes::BytesMut> = None;
        for (s, data) in self.chunks.by_ref() {
            let len = piece.as_ref().map_or(first.len(), bytes::BytesMut::len);
            if s != stream || len + data.len() > self.max {
                self.next = Some((s, data));
                break;
            }
            piece
                .get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                .extend_from_slice(&data);
        }
        // A lone chunk goes as it is, uncopied.
        Some((stream, piece.map_or(first, bytes::BytesMut::freeze)))
    }
}

impl Ring {
    /// An empty ring keeping at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        Self { chunks: VecDeque::new(), kept: 0, total: 0, cap }
    }

    /// Bytes printed in all.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Most bytes kept.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes kept now.
    pub(crate) fn kept(&self) -> usize {
        self.kept
    }

    /// Offset of the oldest byte kept.
    pub(crate) fn start(&self) -> u64 {
        self.total - self.kept as u64
    }

    /// Appends output; the oldest bytes beyond the cap are forgotten
    /// (a chunk may be cut at its front).
    pub(crate) fn push(&mut self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let len = data.len();
        self.chunks.push_back(Chunk { at: self.total, stream, data });
        self.total += len as u64;
        self.kept += len;
        while self.kept > self.cap {
            let excess = self.kept - self.cap;
            let Some(front) = self.chunks.pop_front() else { break };
            if front.data.len() > excess {
                self.chunks.push_front(Chunk {
                    at: front.at + excess as u64,
                    stream: front.stream,
                    data: front.data.slice(excess..),
                });
                self.kept -= excess;
            } else {
                self.kept -= front.data.len();
            }
        }
    }

    /// Everything kept.
    pub(crate) fn all(&self) -> Since {
        let out = self.chunks.iter().map(|c| (c.stream, c.data.clone()));
        (out.collect(), self.total)
    }

    /// The output after `cursor`.
    ///
    /// # Errors
    /// How many bytes after `cursor` are no longer kept.
    pub(crate) fn since(&self, cursor: u64) -> Result<Since, u64> {
        if cursor < self.start() {
            return Err(self.start() - cursor);
        }
        let mut out = Vec::new();
        for c in self.chunks.iter().rev() {
            let end = c.at + c.data.len() as u64;
            if end <= cursor {
                break;
            }
            // `cursor >= start` and chunks are contiguous: this slice
            // is within the chunk.
            let skip = usize::try_from(cursor.saturating_sub(c.at))
                .unwrap_or(usize::MAX)
                .min(c.data.len());
            out.push((c.stream, c.data.slice(skip..)));
        }
        out.reverse();
        Ok((out, self.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(chunks: &[(Stream, Bytes)]) -> String {
        chunks
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn keeps_the_newest_bytes_with_their_streams() {
        let mut r = Ring::new(8);
        r.push(Stream::Stdout, Bytes::from_static(b"abcdef"));
        r.push(Stream::Stderr, Bytes::from_static(b"ghij"));
        assert_eq!((r.total(), r.kept(), r.start()), (10, 8, 2));
        let (all, at) = r.all();
        assert_eq!(text(&all), "cdefghij");
        assert_eq!(all[0].0, Stream::Stdout);
        assert_eq!(all[1].0, Stream::Stderr);
        assert_eq!(at, 10);
    }

    #[test]
    fn a_reader_gets_what_came_after_its_cursor_once() {
        let mut r = Ring::new(100);
        r.push(Stream::Stdout, Bytes::from_static(b"one "));
        let (_, cursor) = r.all();
        r.push(Stream::Stdout, Bytes::from_static(b"two "));
        r.push(Stream::Stderr, Bytes::from_static(b"three"));
        let (got, cursor) = r.since(cursor).expect("kept");
        assert_eq!(text(&got), "two three");
        let (got, _) = r.since(cursor).expect("kept");
        assert!(got.is_empty());
        // A cursor inside a chunk gets its tail.
        let (got, _) = r.since(6).expect("kept");
        assert_eq!(text(&got), "o three");
    }

    #[test]
    fn small_chunks_of_one_stream_are_joined_up_to_the_limit() {
        let line = Bytes::from_static(b"0123456789");
        let mut chunks = vec![(Stream::Stdout, line.clone()); 25];
        chunks.push((Stream::Stderr, Bytes::from_static(b"err")));
        chunks.push((Stream::Stdout, line));
        let joined: Vec<_> = Pieces::new(chunks, 100).collect();
        let shape: Vec<(Stream, usize)> =
            joined.iter().map(|(s, b)| (*s, b.len())).collect();
        assert_eq!(
            shape,
            [
                (Stream::Stdout, 100),
                (Stream::Stdout, 100),
                (Stream::Stdout, 50),
                (Stream::Stderr, 3),
                (Stream::Stdout, 10)
            ]
        );
        assert_eq!(text(&joined).len(), 263);
    }

    #[test]
    fn a_reader_behind_the_kept_bytes_is_told_how_much_it_lost() {
        let mut r = Ring::new(4);
        r.push(Stream::Stdout, Bytes::from_static(b"12345678"));
        assert_eq!(r.since(1).err(), Some(3));
        assert_eq!(text(&r.since(4).expect("kept").0), "5678");
        assert!(r.since(8).expect("nothing new").0.is_empty());
    }
}
