//! Close codes and close frame payloads (RFC 6455 §5.5.1, §7.4).

use bytes::Bytes;

use crate::proto::error::ProtocolError;

/// Whether a peer may send `code` in a close frame.
///
/// Valid: 1000-1003 and 1007-1011 (RFC 6455 §7.4.1), 1012-1014 (registered later by IANA:
/// service restart, try again later, bad gateway; browsers send them and current Autobahn
/// accepts them), and 3000-4999 (libraries, frameworks and private use, §7.4.2). Invalid:
/// below 1000, 1004 (reserved), 1005, 1006 and 1015 (MUST NOT be sent on the wire), the
/// unassigned rest of 1016-2999, and 5000 and above.
#[must_use]
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A close frame's code and reason, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// A code for which [`is_valid_close_code`] holds.
    pub code: u16,
    /// The reason, already checked to be valid UTF-8; possibly empty.
    pub reason: Bytes,
}

/// Splits a close payload into its code and reason and checks both.
///
/// Returns `Ok(None)` for an empty payload (a close without a code).
///
/// # Errors
/// [`ProtocolError::InvalidClosePayload`] for a 1-byte payload,
/// [`ProtocolError::InvalidCloseCode`] for a code that may not be sent, and
/// [`ProtocolError::InvalidUtf8`] for a reason that is not UTF-8.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &[u8])>, ProtocolError> {
    let (code, reason) = match payload {
        [] => return Ok(None),
        [_] => return Err(ProtocolError::InvalidClosePayload),
        [high, low, reason @ ..] => (u16::from_be_bytes([*high, *low]), reason),
    };
    if !is_valid_close_code(code) {
        return Err(ProtocolError::InvalidCloseCode(code));
    }
    if simdutf8::basic::from_utf8(reason).is_err() {
        return Err(ProtocolError::InvalidUtf8);
    }
    Ok(Some((code, reason)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_close_codes_per_rfc_and_iana() {
        let valid = [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ];
        let invalid = [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in valid {
            assert!(is_valid_close_code(code), "{code}");
        }
        for code in invalid {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn parses_empty_code_only_and_code_with_reason() {
        assert_eq!(parse_close_payload(b""), Ok(None));
        assert_eq!(
            parse_close_payload(&[0x03, 0xe8]),
            Ok(Some((1000, &b""[..])))
        );
        assert_eq!(
            parse_close_payload(b"\x03\xe9going \xe2\x86\x92 away"),
            Ok(Some((1001, "going \u{2192} away".as_bytes())))
        );
    }

    #[test]
    fn rejects_one_byte_payload() {
        assert_eq!(
            parse_close_payload(&[0x03]),
            Err(ProtocolError::InvalidClosePayload)
        );
    }

    #[test]
    fn rejects_invalid_close_code() {
        assert_eq!(
            parse_close_payload(&[0x03, 0xed]),
            Err(ProtocolError::InvalidCloseCode(1005))
        );
    }

    #[test]
    fn rejects_invalid_utf8_reason() {
        let error = parse_close_payload(b"\x03\xe8\xce\xba\xed\xa0\x80").unwrap_err();
        assert_eq!(error, ProtocolError::InvalidUtf8);
        assert_eq!(error.close_code(), 1007);
    }
}
