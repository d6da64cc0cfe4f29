//! Incremental UTF-8 validation that survives fragment and read boundaries and fails as soon as
//! a byte sequence can no longer become valid (RFC 6455 §8.1, RFC 3629 §4).

use crate::proto::error::ProtocolError;

/// Validates a text message fed in arbitrary pieces.
///
/// [`Utf8Validator::feed`] fails on the first byte that cannot be part of valid UTF-8, even in
/// the middle of a code point (Autobahn 6.4.x expects the close before the rest of the frame
/// arrives). Between calls it keeps the at most 3 bytes of an unfinished code point.
/// [`Utf8Validator::finish`] ends the message.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    /// The start of an unfinished code point; only `partial[..partial_len]` is meaningful.
    partial: [u8; 4],
    /// At most 3: a byte keeps the validator (one per connection) at 5 bytes.
    partial_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next piece of the message.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] as soon as the bytes seen so far cannot be the start of
    /// valid UTF-8. After an error the validator must not be fed again.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ProtocolError> {
        // Complete the code point carried over from the previous piece, byte by byte.
        while self.partial_len > 0 {
            let Some((&byte, rest)) = bytes.split_first() else {
                return Ok(());
            };
            self.push(byte)?;
            bytes = rest;
        }
        match simdutf8::compat::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(error) if error.error_len().is_none() => {
                // Valid up to an incomplete sequence at the end: carry it over, checking each
                // byte against the exact ranges again rather than trusting the bulk check.
                for &byte in &bytes[error.valid_up_to()..] {
                    self.push(byte)?;
                }
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }

    /// Ends the message and resets the validator for the next one.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] if the message ended inside a code point.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let incomplete = self.partial_len > 0;
        self.partial_len = 0;
        if incomplete {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(())
    }

    /// Appends one byte to the unfinished code point, clearing it once it is complete.
    fn push(&mut self, byte: u8) -> Result<(), ProtocolError> {
        let valid = match self.partial_len {
            0 => sequence_len(byte) > 1,
            1 => second_byte_range(self.partial[0]).contains(&byte),
            _ => (0x80..=0xBF).contains(&byte),
        };
        if !valid {
            return Err(ProtocolError::InvalidUtf8);
        }
        self.partial[usize::from(self.partial_len)] = byte;
        self.partial_len += 1;
        if usize::from(self.partial_len) == sequence_len(self.partial[0]) {
            self.partial_len = 0;
        }
        Ok(())
    }
}

/// Length of the sequence a lead byte starts; 1 for ASCII and 0 for bytes that never lead
/// (continuation bytes, C0, C1 and F5-FF).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    }
}

/// The allowed second bytes after a multi-byte lead (RFC 3629 §4; Unicode Table 3-7), which
/// exclude overlong forms (E0, F0), surrogates (ED) and code points above U+10FFFF (F4).
fn second_byte_range(lead: u8) -> std::ops::RangeInclusive<u8> {
    match lead {
        0xE0 => 0xA0..=0xBF,
        0xED => 0x80..=0x9F,
        0xF0 => 0x90..=0xBF,
        0xF4 => 0x80..=0x8F,
        _ => 0x80..=0xBF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_whole(bytes: &[u8]) -> Result<(), ProtocolError> {
        let mut validator = Utf8Validator::new();
        validator.feed(bytes)?;
        validator.finish()
    }

    fn validate_bytewise(bytes: &[u8]) -> Result<(), ProtocolError> {
        let mut validator = Utf8Validator::new();
        for byte in bytes {
            validator.feed(std::slice::from_ref(byte))?;
        }
        validator.finish()
    }

    /// Valid and invalid samples in the spirit of Markus Kuhn's UTF-8 decoder stress test.
    const VALID: &[&[u8]] = &[
        b"",
        b"Hello-\xc2\xb5@\xc3\x9f\xc3\xb6\xc3\xa4\xc3\xbc\xc3\xa0\xc3\xa1-UTF-8!!",
        "\u{3ba}\u{1f79}\u{3c3}\u{3bc}\u{3b5}".as_bytes(),
        b"\x00",
        b"\xc2\x80",
        b"\xe0\xa0\x80",
        b"\xf0\x90\x80\x80",
        b"\x7f",
        b"\xdf\xbf",
        b"\xef\xbf\xbf",
        b"\xf4\x8f\xbf\xbf",
        b"\xed\x9f\xbf",
        b"\xee\x80\x80",
        b"\xef\xbf\xbd",
        b"\xef\xbf\xbe",
    ];

    const INVALID: &[&[u8]] = &[
        b"\x80",
        b"\xbf",
        b"\x80\xbf\x80",
        b"\xc0\xaf",
        b"\xc1\xbf",
        b"\xe0\x80\xaf",
        b"\xe0\x9f\xbf",
        b"\xf0\x80\x80\xaf",
        b"\xf0\x8f\xbf\xbf",
        b"\xf4\x90\x80\x80",
        b"\xf5\x80\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xfc\x84\x80\x80\x80\x80",
        b"\xfe",
        b"\xff",
        b"\xed\xa0\x80",
        b"\xed\xbf\xbf",
        b"\xed\xa0\x80\xed\xb0\x80",
        b"\xc2",
        b"\xe0\xa0",
        b"\xf0\x90\x80",
        b"\xc2\x41",
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
        b"Hello\xc0world",
    ];

    #[test]
    fn accepts_valid_samples_whole_and_bytewise() {
        for sample in VALID {
            assert_eq!(validate_whole(sample), Ok(()), "{sample:x?}");
            assert_eq!(validate_bytewise(sample), Ok(()), "{sample:x?}");
        }
    }

    #[test]
    fn rejects_invalid_samples_whole_and_bytewise() {
        for sample in INVALID {
            assert_eq!(
                validate_whole(sample),
                Err(ProtocolError::InvalidUtf8),
                "{sample:x?}"
            );
            assert_eq!(
                validate_bytewise(sample),
                Err(ProtocolError::InvalidUtf8),
                "{sample:x?}"
            );
        }
    }

    #[test]
    fn accepts_every_split_of_multibyte_text() {
        let text = "a\u{b5}\u{20ac}\u{10348}z\u{10ffff}\u{800}".as_bytes();
        for first in 0..=text.len() {
            for second in first..=text.len() {
                let mut validator = Utf8Validator::new();
                validator.feed(&text[..first]).unwrap();
                validator.feed(&text[first..second]).unwrap();
                validator.feed(&text[second..]).unwrap();
                assert_eq!(validator.finish(), Ok(()), "splits {first} {second}");
            }
        }
    }

    #[test]
    fn fails_fast_inside_a_code_point() {
        for prefix in [
            &b"\xed\xa0"[..],
            b"\xf4\x90",
            b"\xc0",
            b"\xf5",
            b"\xe0\x80",
            b"\xf0\x80",
            b"ok\xe2\x82\x41",
        ] {
            assert_eq!(
                Utf8Validator::new().feed(prefix),
                Err(ProtocolError::InvalidUtf8),
                "{prefix:x?}"
            );
            let (last, start) = prefix.split_last().unwrap();
            let mut validator = Utf8Validator::new();
            validator.feed(start).unwrap();
            assert_eq!(
                validator.feed(std::slice::from_ref(last)),
                Err(ProtocolError::InvalidUtf8),
                "{prefix:x?} split before the last byte"
            );
        }
    }

    #[test]
    fn keeps_valid_incomplete_prefix_until_finish() {
        let mut validator = Utf8Validator::new();
        validator.feed(b"ab\xf0\x9f").unwrap();
        assert_eq!(validator.finish(), Err(ProtocolError::InvalidUtf8));
        validator.feed(b"fresh message").unwrap();
        assert_eq!(validator.finish(), Ok(()));
    }
}
