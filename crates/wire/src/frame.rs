//! Framing of the multiplexed agent channel.
//!
//! The host and the guest agent talk over one byte stream (a
//! virtio-serial port). The stream is cut into frames; each frame belongs
//! to a *channel*, so many requests can be in flight at once.
//!
//! ```text
//!  0        4        8   9
//!  +--------+--------+---+------------------+
//!  | length | chan   | k | payload (length) |
//!  +--------+--------+---+------------------+
//!    u32 BE   u32 BE  u8
//! ```
//!
//! A channel's life: the host sends [`Kind::Open`] with a JSON
//! [`crate::agent::Request`]; either side may then send [`Kind::Data`]
//! frames (first payload byte is the [`Stream`]); the host ends its input
//! with [`Kind::Eof`] or aborts with [`Kind::Cancel`]; the agent closes
//! the channel with exactly one [`Kind::Reply`] carrying a JSON
//! [`crate::agent::Reply`]. Channel ids are chosen by the host and must
//! not be reused while open.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Largest payload a frame may carry. Bigger data is split by the
/// sender; a frame announcing more is a protocol error, so a corrupt
/// length can never make the reader allocate gigabytes.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 9;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host -> agent: open a channel; payload is a JSON request.
    Open = 1,
    /// Either way: bytes of one stream; payload starts with the stream tag.
    Data = 2,
    /// Host -> agent: no more input on this channel.
    Eof = 3,
    /// Agent -> host: final answer; payload is a JSON reply.
    Reply = 4,
    /// Host -> agent: abort the channel's work (kill the process).
    Cancel = 5,
    /// Host -> agent: a JSON control message for an open channel
    /// (signal, terminal resize).
    Control = 6,
    /// Agent -> host: the agent took data frames of this channel off
    /// its queue; payload is how many (u32 BE). See [`DATA_WINDOW`].
    Window = 7,
    /// Agent -> host: a JSON [`crate::agent::Event`] on an open
    /// channel, before its reply.
    Event = 8,
}

/// Data frames the host may have sent on one channel and not yet seen
/// granted back by a [`Kind::Window`]. Flow control per channel: a
/// process that does not read its input stops the host from sending
/// more on that channel only, instead of filling the agent's queue and
/// stalling every other channel of the VM. The agent's per-channel
/// queue holds more frames than this, so its reader never waits.
pub const DATA_WINDOW: u32 = 8;

impl TryFrom<u8> for Kind {
    type Error = FrameError;

    fn try_from(b: u8) -> Result<Self, FrameError> {
        match b {
            1 => Ok(Self::Open),
            2 => Ok(Self::Data),
            3 => Ok(Self::Eof),
            4 => Ok(Self::Reply),
            5 => Ok(Self::Cancel),
            6 => Ok(Self::Control),
            7 => Ok(Self::Window),
            8 => Ok(Self::Event),
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

/// The stream a [`Kind::Data`] frame belongs to (its first payload byte).
/// The numbering matches the public exec WebSocket framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stream {
    /// Input to the process, or file content sent to the agent.
    Stdin = 0,
    /// Standard output, or file content read from the guest.
    Stdout = 1,
    /// Standard error.
    Stderr = 2,
}

impl TryFrom<u8> for Stream {
    type Error = FrameError;

    fn try_from(b: u8) -> Result<Self, FrameError> {
        match b {
            0 => Ok(Self::Stdin),
            1 => Ok(Self::Stdout),
            2 => Ok(Self::Stderr),
            other => Err(FrameError::UnknownStream(other)),
        }
    }
}

/// One frame of the agent channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Channel the frame belongs to.
    pub chan: u32,
    /// What it carries.
    pub kind: Kind,
    /// Raw payload (for `Data`, including the stream tag byte).
    pub payload: Bytes,
}

impl Frame {
    /// A frame with a JSON payload.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] when the encoded JSON exceeds
    /// [`MAX_PAYLOAD`].
    pub fn json<T: serde::Serialize>(
        chan: u32,
        kind: Kind,
        value: &T,
    ) -> Result<Self, FrameError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| FrameError::Json(e.to_string()))?;
        if body.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(body.len()));
        }
        Ok(Self { chan, kind, payload: Bytes::from(body) })
    }

    /// A data frame of `stream`; `data` must be at most
    /// `MAX_PAYLOAD - 1` bytes (use [`Frame::data_chunks`] otherwise).
    #[must_use]
    pub fn data(chan: u32, stream: Stream, data: &[u8]) -> Self {
        debug_assert!(data.len() < MAX_PAYLOAD);
        let mut buf = BytesMut::with_capacity(data.len() + 1);
        buf.put_u8(stream as u8);
        buf.put_slice(data);
        Self { chan, kind: Kind::Data, payload: buf.freeze() }
    }

    /// Splits `data` into as many data frames as needed.
    pub fn data_chunks(
        chan: u32,
        stream: Stream,
        data: &[u8],
    ) -> impl Iterator<Item = Frame> + '_ {
        data.chunks(MAX_PAYLOAD - 1).map(move |c| Self::data(chan, stream, c))
    }

    /// An empty frame (Eof, Cancel).
    #[must_use]
    pub fn empty(chan: u32, kind: Kind) -> Self {
        Self { chan, kind, payload: Bytes::new() }
    }

    /// A grant of `n` more data frames on `chan`.
    #[must_use]
    pub fn window(chan: u32, n: u32) -> Self {
        Self {
            chan,
            kind: Kind::Window,
            payload: Bytes::copy_from_slice(&n.to_be_bytes()),
        }
    }

    /// The count a [`Kind::Window`] frame grants.
    ///
    /// # Errors
    /// When the frame is not a well-formed window frame.
    pub fn as_window(&self) -> Result<u32, FrameError> {
        match (self.kind, <[u8; 4]>::try_from(&self.payload[..])) {
            (Kind::Window, Ok(b)) => Ok(u32::from_be_bytes(b)),
            _ => Err(FrameError::Json("malformed window frame".into())),
        }
    }

    /// Splits a data frame into its stream and bytes.
    ///
    /// # Errors
    /// When the frame is not `Data`, is empty, or has an unknown tag.
    pub fn as_data(&self) -> Result<(Stream, Bytes), FrameError> {
        if self.kind != Kind::Data || self.payload.is_empty() {
            return Err(FrameError::NotData);
        }
        let stream = Stream::try_from(self.payload[0])?;
        Ok((stream, self.payload.slice(1..)))
    }

    /// Parses the JSON payload.
    ///
    /// # Errors
    /// [`FrameError::Json`] when the payload is not the expected JSON.
    pub fn parse<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| FrameError::Json(e.to_string()))
    }
}

/// Why a byte stream is not a valid sequence of frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A header announced a payload above [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The kind byte is not one we know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The stream byte of a data frame is not one we know.
    #[error("unknown data stream {0}")]
    UnknownStream(u8),
    /// Expected a data frame.
    #[error("not a data frame")]
    NotData,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
    /// A JSON payload did not parse.
    #[error("bad JSON payload: {0}")]
    Json(String),
    /// The underlying byte stream failed.
    #[error("channel I/O failed: {0}")]
    Io(String),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// `tokio_util` codec for [`Frame`]s.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let kind = Kind::try_from(src[8])?;
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let chan = src.get_u32();
        src.advance(1);
        let payload = src.split_to(len).freeze();
        Ok(Some(Frame { chan, kind, payload }))
    }

    fn decode_eof(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(
        &mut self,
        frame: Frame,
        dst: &mut BytesMut,
    ) -> Result<(), FrameError> {
        let len = frame.payload.len();
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        dst.reserve(HEADER_LEN + len);
        // Checked above: len <= MAX_PAYLOAD fits in u32.
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        dst.put_u32(frame.chan);
        dst.put_u8(frame.kind as u8);
        dst.put_slice(&frame.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(frame: Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec.encode(frame, &mut buf).expect("frame fits");
        buf
    }

    #[test]
    fn round_trips_a_data_frame() {
        let frame = Frame::data(7, Stream::Stderr, b"oops\n");
        let mut buf = encode(frame.clone());
        let back = FrameCodec.decode(&mut buf).expect("valid").expect("full");
        assert_eq!(back, frame);
        assert_eq!(back.as_data(), Ok((Stream::Stderr, "oops\n".into())));
        assert!(buf.is_empty());
    }

    #[test]
    fn waits_for_the_rest_of_a_partial_frame() {
        let full = encode(Frame::data(1, Stream::Stdout, b"hello"));
        let mut buf = BytesMut::from(&full[..full.len() - 2]);
        assert_eq!(FrameCodec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&full[full.len() - 2..]);
        assert!(FrameCodec.decode(&mut buf).expect("valid").is_some());
    }

    #[test]
    fn truncated_stream_is_an_error_at_eof() {
        let full = encode(Frame::data(1, Stream::Stdout, b"hello"));
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(
            FrameCodec.decode_eof(&mut buf),
            Err(FrameError::Truncated(full.len() - 1))
        );
    }

    #[test]
    fn truncated_header_is_an_error_at_eof() {
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert_eq!(
            FrameCodec.decode_eof(&mut buf),
            Err(FrameError::Truncated(3))
        );
    }

    #[test]
    fn oversized_header_is_rejected_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::try_from(MAX_PAYLOAD + 1).expect("small"));
        buf.put_u32(1);
        buf.put_u8(Kind::Data as u8);
        assert_eq!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn oversized_payload_is_not_encoded() {
        let frame = Frame {
            chan: 1,
            kind: Kind::Data,
            payload: Bytes::from(vec![0u8; MAX_PAYLOAD + 1]),
        };
        let mut buf = BytesMut::new();
        assert_eq!(
            FrameCodec.encode(frame, &mut buf),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        buf.put_u32(1);
        buf.put_u8(99);
        assert_eq!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::UnknownKind(99))
        );
    }

    #[test]
    fn big_data_is_split_into_legal_frames() {
        let data = vec![5u8; MAX_PAYLOAD * 2 + 10];
        let frames: Vec<_> =
            Frame::data_chunks(3, Stream::Stdout, &data).collect();
        assert_eq!(frames.len(), 3);
        let total: usize = frames.iter().map(|f| f.payload.len() - 1).sum();
        assert_eq!(total, data.len());
        assert!(frames.iter().all(|f| f.payload.len() <= MAX_PAYLOAD));
    }

    proptest! {
        #[test]
        fn any_frame_sequence_survives_any_split(
            frames in proptest::collection::vec(
                (any::<u32>(), 0u8..3,
                 proptest::collection::vec(any::<u8>(), 0..300)),
                1..20),
            cut in any::<usize>(),
        ) {
            let frames: Vec<Frame> = frames
                .into_iter()
                .map(|(chan, s, data)| {
                    let stream = Stream::try_from(s).expect("0..3");
                    Frame::data(chan, stream, &data)
                })
                .collect();
            let mut wire = BytesMut::new();
            for f in &frames {
                FrameCodec.encode(f.clone(), &mut wire).expect("fits");
            }
            let cut = cut % (wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = FrameCodec.decode(&mut buf).expect("ok") {
                got.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = FrameCodec.decode(&mut buf).expect("ok") {
                got.push(f);
            }
            prop_assert_eq!(got, frames);
        }
    }
}
