//! `proto::Utf8Validator` fed arbitrary bytes in arbitrary pieces.
//!
//! Invariants, with `std::str::from_utf8` as the oracle:
//! - feeding every piece and then `finish` succeeds exactly when the whole input is UTF-8;
//! - it fails fast: `feed` errs only once the bytes fed so far cannot begin any valid UTF-8
//!   (std reports a definite error, not just an incomplete end), and never before;
//! - after `finish` the validator is reset: a second message is judged on its own.
#![no_main]

use herald::proto::Utf8Validator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte seeds the piece sizes; the rest is the message.
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let expected = std::str::from_utf8(input).is_ok();

    let mut validator = Utf8Validator::new();
    let mut fed = 0;
    let mut failed = false;
    for piece in Pieces::new(input, seed) {
        let result = validator.feed(piece);
        fed += piece.len();
        let seen = std::str::from_utf8(&input[..fed]);
        let hopeless = seen.as_ref().is_err_and(|e| e.error_len().is_some());
        match result {
            Ok(()) => assert!(!hopeless, "feed accepted {fed} bytes that cannot be UTF-8"),
            Err(_) => {
                assert!(hopeless, "feed rejected {fed} bytes that may still become UTF-8");
                failed = true;
                break;
            }
        }
    }
    if !failed {
        let finished = validator.finish().is_ok();
        assert_eq!(finished, expected, "finish disagrees with std on the whole input");

        // Reset: the same validator now judges the input again, fed whole.
        let again = validator.feed(input).and_then(|()| validator.finish()).is_ok();
        assert_eq!(again, expected, "a reused validator disagrees with std");
    }
    assert!(!(failed && expected), "feed failed on valid input");
});

/// Splits `input` into pieces whose sizes come from `seed`: 0 feeds it whole, 1..=16 a fixed
/// size, anything else pseudo-random sizes of 0 to 7 bytes (empty pieces included).
struct Pieces<'a> {
    rest: &'a [u8],
    seed: u8,
    state: u32,
}

impl<'a> Pieces<'a> {
    fn new(input: &'a [u8], seed: u8) -> Self {
        Self {
            rest: input,
            seed,
            state: u32::from(seed).wrapping_mul(0x9E37_79B9) | 1,
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let size = match self.seed {
            0 => self.rest.len(),
            1..=16 => usize::from(self.seed),
            _ => {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 17;
                self.state ^= self.state << 5;
                (self.state % 8) as usize
            }
        };
        let (piece, rest) = self.rest.split_at(size.min(self.rest.len()));
        self.rest = rest;
        Some(piece)
    }
}
