//! The RFC 6455 §5.2 frame header: parse and encode, plus encoders for whole frames.

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::error::ProtocolError;
use crate::proto::mask::apply_mask;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame's opcode (RFC 6455 §5.2); reserved values have no variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: a further fragment of a text or binary message.
    Continuation,
    /// 0x1: the first (or only) frame of a UTF-8 text message.
    Text,
    /// 0x2: the first (or only) frame of a binary message.
    Binary,
    /// 0x8: close handshake (§5.5.1).
    Close,
    /// 0x9: ping (§5.5.2).
    Ping,
    /// 0xA: pong (§5.5.3).
    Pong,
}

impl OpCode {
    /// Whether this is a control opcode (close, ping, pong), which has its own rules (§5.5).
    #[must_use]
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

impl TryFrom<u8> for OpCode {
    type Error = ProtocolError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0x0 => Ok(Self::Continuation),
            0x1 => Ok(Self::Text),
            0x2 => Ok(Self::Binary),
            0x8 => Ok(Self::Close),
            0x9 => Ok(Self::Ping),
            0xA => Ok(Self::Pong),
            reserved => Err(ProtocolError::ReservedOpcode(reserved)),
        }
    }
}

impl From<OpCode> for u8 {
    fn from(opcode: OpCode) -> Self {
        match opcode {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }
}

/// A frame header (RFC 6455 §5.2), everything before the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of the message.
    pub fin: bool,
    /// RSV1-RSV3 as the low 3 bits (RSV1 = 0b100).
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key; every client frame has one (§5.3), server frames none.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Parses a header from the start of `buf`.
    ///
    /// Returns the header and its length in bytes, or `Ok(None)` when `buf` does not yet hold
    /// the whole header; nothing is consumed either way, the caller advances past the header.
    /// RSV bits and masking are reported, not checked: whether they are allowed depends on
    /// the negotiated extensions and the side, which the decoder knows.
    ///
    /// # Errors
    /// Reserved opcodes, a 64-bit length with its top bit set, non-minimal lengths, and
    /// fragmented or over-long control frames, as soon as the bytes present show them.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        let [first, second, rest @ ..] = buf else {
            return Ok(None);
        };
        let fin = first & 0x80 != 0;
        let rsv = (first >> 4) & 0x07;
        let opcode = OpCode::try_from(first & 0x0F)?;
        let masked = second & 0x80 != 0;
        let short_len = second & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if usize::from(short_len) > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        }

        let (payload_len, len_bytes) = match short_len {
            126 => {
                let Some(&[high, low]) = rest.first_chunk::<2>() else {
                    return Ok(None);
                };
                let len = u16::from_be_bytes([high, low]);
                if len < 126 {
                    return Err(ProtocolError::NonMinimalLength);
                }
                (u64::from(len), 2)
            }
            127 => {
                let Some(bytes) = rest.first_chunk::<8>() else {
                    return Ok(None);
                };
                let len = u64::from_be_bytes(*bytes);
                if len >> 63 != 0 {
                    return Err(ProtocolError::LengthMsbSet);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(ProtocolError::NonMinimalLength);
                }
                (len, 8)
            }
            len => (u64::from(len), 0),
        };

        let rest = &rest[len_bytes..];
        let mask = if masked {
            let Some(key) = rest.first_chunk::<4>() else {
                return Ok(None);
            };
            Some(*key)
        } else {
            None
        };
        let header = Self {
            fin,
            rsv,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, header.encoded_len())))
    }

    /// Length of the encoded header in bytes: 2 to 14.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let len_bytes = match self.payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + len_bytes + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Writes the header, with the length in its minimal encoding; `dst` must have room
    /// for [`FrameHeader::encoded_len`] bytes (a `BytesMut` grows as needed).
    pub fn encode(&self, dst: &mut impl BufMut) {
        let fin = if self.fin { 0x80 } else { 0 };
        dst.put_u8(fin | ((self.rsv & 0x07) << 4) | u8::from(self.opcode));
        let masked = if self.mask.is_some() { 0x80 } else { 0 };
        match self.payload_len {
            len @ 0..=125 => dst.put_u8(masked | len as u8),
            len @ 126..=0xFFFF => {
                dst.put_u8(masked | 126);
                dst.put_u16(len as u16);
            }
            len => {
                dst.put_u8(masked | 127);
                dst.put_u64(len);
            }
        }
        if let Some(key) = self.mask {
            dst.put_slice(&key);
        }
    }
}

/// A complete, unmasked, final server frame, in one allocation of exactly its size.
///
/// Control payloads must be at most 125 bytes (checked in debug builds).
#[must_use]
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    debug_assert!(!opcode.is_control() || payload.len() <= MAX_CONTROL_PAYLOAD);
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut frame = BytesMut::with_capacity(header.encoded_len() + payload.len());
    header.encode(&mut frame);
    frame.put_slice(payload);
    frame.freeze()
}

/// The payload of a complete unmasked frame this server encoded, sharing its allocation.
pub fn server_frame_payload(frame: &Bytes) -> Bytes {
    let (header, len) = FrameHeader::parse(frame)
        .ok()
        .flatten()
        .expect("server frames are well-formed");
    debug_assert_eq!(frame.len() as u64, len as u64 + header.payload_len);
    frame.slice(len..)
}

/// A server close frame with `code` and `reason`, the reason cut at a character boundary to
/// fit the 125-byte control payload.
#[must_use]
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut frame = BytesMut::with_capacity(4 + reason.len());
    frame.put_u8(0x80 | u8::from(OpCode::Close));
    frame.put_u8(2 + end as u8);
    frame.put_u16(code);
    frame.put_slice(reason);
    frame.freeze()
}

/// A masked client frame, for tests and the benchmark client.
#[must_use]
pub fn encode_client_frame(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let header = FrameHeader {
        fin,
        rsv: 0,
        opcode,
        mask: Some(mask),
        payload_len: payload.len() as u64,
    };
    let header_len = header.encoded_len();
    let mut frame = BytesMut::with_capacity(header_len + payload.len());
    header.encode(&mut frame);
    frame.put_slice(payload);
    apply_mask(&mut frame[header_len..], mask, 0);
    frame.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn parse_all(bytes: &[u8]) -> (FrameHeader, usize) {
        FrameHeader::parse(bytes).unwrap().unwrap()
    }

    #[test]
    fn parses_rfc_unmasked_hello() {
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (header, len) = parse_all(&bytes);
        assert_eq!(len, 2);
        assert!(header.fin);
        assert_eq!(header.opcode, OpCode::Text);
        assert_eq!(header.mask, None);
        assert_eq!(header.payload_len, 5);
        assert_eq!(encode_frame(OpCode::Text, b"Hello"), &bytes[..]);
    }

    #[test]
    fn parses_rfc_masked_hello() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (header, len) = parse_all(&bytes);
        assert_eq!(len, 6);
        assert_eq!(header.mask, Some(RFC_MASK));
        assert_eq!(header.payload_len, 5);
        assert_eq!(
            encode_client_frame(OpCode::Text, true, b"Hello", RFC_MASK),
            bytes
        );
    }

    #[test]
    fn parses_rfc_fragmented_hello() {
        let first = [0x01, 0x03, 0x48, 0x65, 0x6c];
        let second = [0x80, 0x02, 0x6c, 0x6f];
        let (header, _) = parse_all(&first);
        assert!(!header.fin);
        assert_eq!(header.opcode, OpCode::Text);
        assert_eq!(header.payload_len, 3);
        let (header, _) = parse_all(&second);
        assert!(header.fin);
        assert_eq!(header.opcode, OpCode::Continuation);
        assert_eq!(header.payload_len, 2);
    }

    #[test]
    fn parses_rfc_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        assert_eq!(parse_all(&ping).0.opcode, OpCode::Ping);
        assert_eq!(encode_frame(OpCode::Ping, b"Hello"), &ping[..]);
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(parse_all(&pong).0.opcode, OpCode::Pong);
    }

    #[test]
    fn parses_rfc_256_byte_and_64k_binary_headers() {
        let (header, len) = parse_all(&[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(
            (header.opcode, header.payload_len, len),
            (OpCode::Binary, 256, 4)
        );
        let big = [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
        let (header, len) = parse_all(&big);
        assert_eq!((header.payload_len, len), (65536, 10));

        let frame = encode_frame(OpCode::Binary, &[0; 256]);
        assert_eq!(&frame[..4], &[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(frame.len(), 260);
        let frame = encode_frame(OpCode::Binary, &vec![0; 65536]);
        assert_eq!(&frame[..10], &big);
        assert_eq!(frame.len(), 65546);
    }

    #[test]
    fn needs_more_bytes_for_every_header_prefix() {
        for frame in [
            encode_client_frame(OpCode::Text, true, b"Hello", RFC_MASK),
            encode_client_frame(OpCode::Binary, true, &[7; 300], RFC_MASK),
            encode_client_frame(OpCode::Binary, false, &[7; 70000], RFC_MASK),
        ] {
            let (_, header_len) = parse_all(&frame);
            for end in 0..header_len {
                assert_eq!(FrameHeader::parse(&frame[..end]), Ok(None), "prefix {end}");
            }
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        for payload_len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, 1 << 40] {
            for mask in [None, Some(RFC_MASK)] {
                let header = FrameHeader {
                    fin: payload_len % 2 == 0,
                    rsv: 0b101,
                    opcode: OpCode::Binary,
                    mask,
                    payload_len,
                };
                let mut buf = BytesMut::new();
                header.encode(&mut buf);
                assert_eq!(buf.len(), header.encoded_len());
                assert_eq!(parse_all(&buf), (header, buf.len()));
            }
        }
    }

    #[test]
    fn rejects_reserved_opcodes() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                FrameHeader::parse(&[0x80 | opcode, 0x80]),
                Err(ProtocolError::ReservedOpcode(opcode))
            );
        }
    }

    #[test]
    fn rejects_non_minimal_lengths() {
        assert_eq!(
            FrameHeader::parse(&[0x82, 0x7E, 0x00, 0x7D]),
            Err(ProtocolError::NonMinimalLength)
        );
        assert_eq!(
            FrameHeader::parse(&[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]),
            Err(ProtocolError::NonMinimalLength)
        );
    }

    #[test]
    fn rejects_64_bit_length_with_msb_set() {
        assert_eq!(
            FrameHeader::parse(&[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::LengthMsbSet)
        );
    }

    #[test]
    fn rejects_fragmented_control_frame() {
        assert_eq!(
            FrameHeader::parse(&[0x09, 0x80]),
            Err(ProtocolError::FragmentedControlFrame)
        );
    }

    #[test]
    fn rejects_control_frame_longer_than_125() {
        assert_eq!(
            FrameHeader::parse(&[0x89, 0xFE]),
            Err(ProtocolError::ControlFrameTooLong)
        );
    }

    #[test]
    fn reports_rsv_bits_without_rejecting() {
        let (header, _) = parse_all(&[0xC1, 0x80, 1, 2, 3, 4]);
        assert_eq!(header.rsv, 0b100);
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let frame = encode_close(1000, &"\u{e9}".repeat(100));
        assert_eq!(frame.len(), 4 + 122);
        assert_eq!(&frame[..4], &[0x88, 124, 0x03, 0xe8]);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
        assert_eq!(&encode_close(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
    }
}
