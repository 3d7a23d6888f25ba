//! The versioned wire codec.
//!
//! Every stream (TCP lane or shared-memory ring) carries a sequence of frames. A frame is a
//! fixed 40-byte little-endian header followed by `len` payload bytes:
//!
//! | bytes | field | meaning |
//! | --- | --- | --- |
//! | 0..2 | magic | `0xB9 0x5E` |
//! | 2 | version | [`WIRE_VERSION`]; another version is refused |
//! | 3 | kind | [`FrameKind`] |
//! | 4..8 | imm | 32-bit immediate of a write (as RDMA's WRITE_WITH_IMM) |
//! | 8..16 | len | payload length |
//! | 16..24 | token | target region of a write |
//! | 24..32 | offset | byte offset of a write in its region |
//! | 32..36 | lane | sender's lane (diagnostics) |
//! | 36..40 | reserved | zero |
//!
//! [`FrameHeader::decode`] checks the magic, version and kind and bounds `len` before anything
//! is allocated; the region bounds of a write are checked by the receiver against its
//! registration table. The [`Encoder`]/[`Decoder`] pair writes and reads the bodies of control
//! messages; every length read is checked against the bytes that remain.

/// Version of the frame layout. Peers with another version are refused at the handshake.
pub const WIRE_VERSION: u8 = 1;
/// Frame magic.
pub const MAGIC: [u8; 2] = [0xB9, 0x5E];
/// Size of a frame header.
pub const HEADER_LEN: usize = 40;
/// Default upper bound of a control message (`BPS_MAX_MESSAGE_BYTES`).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// Upper bound of a handshake payload.
pub const MAX_HELLO: usize = 4096;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// First frame on a stream: who is speaking and on which lane.
    Hello = 1,
    /// A two-sided control message.
    Msg = 2,
    /// A one-sided write with immediate into a region the receiver announced.
    Write = 3,
    /// Authentication: the acceptor's challenge, or the dialer's proof (see [`crate::auth`]).
    Auth = 4,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Msg),
            3 => Some(FrameKind::Write),
            4 => Some(FrameKind::Auth),
            _ => None,
        }
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first two bytes are not the magic.
    #[error("bad frame magic {0:02x?} (not a bps peer, or the stream lost sync)")]
    BadMagic([u8; 2]),
    /// The peer speaks another wire version.
    #[error("wire version {found} is not supported (this build speaks version {WIRE_VERSION})")]
    Version {
        /// The version found.
        found: u8,
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A length larger than allowed.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The body ended early.
    #[error("truncated: needed {needed} more bytes for {what}, {left} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes left.
        left: usize,
    },
    /// A field has a value outside its domain.
    #[error("invalid {what}: {value}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A string field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    Utf8 {
        /// The field.
        what: &'static str,
    },
    /// Bytes left over after the last field.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The kind.
    pub kind: FrameKind,
    /// Immediate value (writes).
    pub imm: u32,
    /// Payload length.
    pub len: u64,
    /// Target region token (writes).
    pub token: u64,
    /// Target offset (writes).
    pub offset: u64,
    /// Sender's lane.
    pub lane: u32,
}

impl FrameHeader {
    /// Encode into the fixed-size header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = WIRE_VERSION;
        b[3] = self.kind as u8;
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.lane.to_le_bytes());
        b
    }

    /// Decode and validate a header. `max_msg` bounds the payload of `Msg` frames, `MAX_HELLO`
    /// that of `Hello`; a `Write`'s length is bounded later against the target region.
    pub fn decode(b: &[u8; HEADER_LEN], max_msg: usize) -> Result<Self, DecodeError> {
        if b[0..2] != MAGIC {
            return Err(DecodeError::BadMagic([b[0], b[1]]));
        }
        if b[2] != WIRE_VERSION {
            return Err(DecodeError::Version { found: b[2] });
        }
        let kind = FrameKind::from_u8(b[3]).ok_or(DecodeError::Kind(b[3]))?;
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |i: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(x)
        };
        let h = FrameHeader {
            kind,
            imm: u32_at(4),
            len: u64_at(8),
            token: u64_at(16),
            offset: u64_at(24),
            lane: u32_at(32),
        };
        let max = match kind {
            FrameKind::Hello | FrameKind::Auth => MAX_HELLO as u64,
            FrameKind::Msg => max_msg as u64,
            FrameKind::Write => u64::MAX,
        };
        if h.len > max {
            return Err(DecodeError::TooLong {
                what: "frame payload",
                len: h.len,
                max,
            });
        }
        Ok(h)
    }
}

/// Little-endian body encoder for control messages.
#[derive(Default, Debug)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }
    /// An encoder that starts with a message tag.
    pub fn with_tag(tag: u8) -> Self {
        let mut e = Self::default();
        e.u8(tag);
        e
    }
    /// Append a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append an i32.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append length-prefixed bytes (u32 length).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    /// Append a length-prefixed UTF-8 string.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
    /// The bytes so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
}

/// Bounds-checked little-endian body decoder.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Decode from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                left: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// Read a byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    /// Read a u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    /// Read a u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Read an i32.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }
    /// Read a u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(b);
        Ok(u64::from_le_bytes(x))
    }
    /// Read length-prefixed bytes of at most `max` bytes.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError::TooLong {
                what,
                len: n as u64,
                max: max as u64,
            });
        }
        self.take(n, what)
    }
    /// Read a length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let b = self.bytes(what, max)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::Utf8 { what })
    }
    /// Read a count that announces `elem_bytes`-sized items: bounded by `max` and by the bytes
    /// left, so a hostile count cannot make the caller allocate.
    pub fn count(
        &mut self,
        what: &'static str,
        elem_bytes: usize,
        max: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        let fits = n.saturating_mul(elem_bytes.max(1)) <= self.buf.len();
        if n > max || !fits {
            return Err(DecodeError::TooLong {
                what,
                len: n as u64,
                max: max.min(self.buf.len() / elem_bytes.max(1)) as u64,
            });
        }
        Ok(n)
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Fail if bytes are left over.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = FrameHeader {
            kind: FrameKind::Write,
            imm: 0xdead_beef,
            len: 1 << 33,
            token: 42,
            offset: 7,
            lane: 3,
        };
        assert_eq!(FrameHeader::decode(&h.encode(), 1024).unwrap(), h);
    }

    #[test]
    fn header_rejects_bad_input() {
        let h = FrameHeader {
            kind: FrameKind::Msg,
            imm: 0,
            len: 2048,
            token: 0,
            offset: 0,
            lane: 0,
        };
        let mut b = h.encode();
        assert!(matches!(
            FrameHeader::decode(&b, 1024),
            Err(DecodeError::TooLong { len: 2048, .. })
        ));
        b[2] = 9;
        assert_eq!(
            FrameHeader::decode(&b, 4096),
            Err(DecodeError::Version { found: 9 })
        );
        b[2] = WIRE_VERSION;
        b[3] = 77;
        assert_eq!(FrameHeader::decode(&b, 4096), Err(DecodeError::Kind(77)));
        b[0] = 0;
        assert!(matches!(
            FrameHeader::decode(&b, 4096),
            Err(DecodeError::BadMagic(_))
        ));
        let mut hello = FrameHeader {
            kind: FrameKind::Hello,
            ..h
        };
        hello.len = MAX_HELLO as u64 + 1;
        assert!(FrameHeader::decode(&hello.encode(), usize::MAX).is_err());
    }

    #[test]
    fn body_round_trip_and_bounds() {
        let mut e = Encoder::with_tag(5);
        e.u32(7).u64(9).str("weights").bytes(&[1, 2, 3]).i32(-4);
        let v = e.finish();
        let mut d = Decoder::new(&v);
        assert_eq!(d.u8("tag").unwrap(), 5);
        assert_eq!(d.u32("a").unwrap(), 7);
        assert_eq!(d.u64("b").unwrap(), 9);
        assert_eq!(d.str("name", 64).unwrap(), "weights");
        assert_eq!(d.bytes("blob", 3).unwrap(), &[1, 2, 3]);
        assert_eq!(d.i32("c").unwrap(), -4);
        d.finish().unwrap();

        // A hostile length is refused before anything is taken.
        let mut e = Encoder::new();
        e.u32(u32::MAX);
        let v = e.finish();
        assert!(matches!(
            Decoder::new(&v).bytes("blob", 1 << 20),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(matches!(
            Decoder::new(&v).count("items", 8, usize::MAX),
            Err(DecodeError::TooLong { .. })
        ));
        let mut d = Decoder::new(&[1, 2]);
        assert!(matches!(d.u32("x"), Err(DecodeError::Truncated { .. })));
        let d = Decoder::new(&[1]);
        assert_eq!(d.finish(), Err(DecodeError::Trailing(1)));
    }
}
