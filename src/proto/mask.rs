//! In-place (un)masking of frame payloads (RFC 6455 §5.3), a machine word at a time.

/// XORs `buf` with the masking key `mask`, in place.
///
/// `offset` is how many bytes of the same payload precede `buf`, so a payload that arrives in
/// pieces can be unmasked piece by piece: byte `i` of `buf` is payload byte `offset + i` and is
/// XORed with `mask[(offset + i) % 4]`. Masking and unmasking are the same operation.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = mask;
    key.rotate_left(offset % 4);

    // Bytes up to the first 8-byte boundary, one by one, so the word loop runs aligned.
    let head_len = buf.as_ptr().align_offset(8).min(buf.len());
    let (head, rest) = buf.split_at_mut(head_len);
    for (i, byte) in head.iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
    key.rotate_left(head_len % 4);

    let (words, tail) = rest.as_chunks_mut::<8>();
    let key_word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    for word in words {
        *word = (u64::from_ne_bytes(*word) ^ key_word).to_ne_bytes();
    }
    // Each word is a multiple of 4 bytes long, so the tail starts at key[0] again.
    for (i, byte) in tail.iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte ^= mask[(offset + i) % 4];
        }
    }

    #[test]
    fn matches_bytewise_reference_across_lengths_offsets_and_alignments() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let source: Vec<u8> = (0..100u8).map(|b| b.wrapping_mul(31)).collect();
        for start in 0..8 {
            for len in 0..=70 {
                for offset in 0..=7 {
                    let mut fast = source.clone();
                    let mut slow = source.clone();
                    apply_mask(&mut fast[start..start + len], mask, offset);
                    reference(&mut slow[start..start + len], mask, offset);
                    assert_eq!(fast, slow, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_at_once() {
        let mask = [1, 2, 3, 4];
        let original: Vec<u8> = (0..50).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, mask, 0);
        for split in 0..=original.len() {
            let mut pieces = original.clone();
            let (first, second) = pieces.split_at_mut(split);
            apply_mask(first, mask, 0);
            apply_mask(second, mask, split);
            assert_eq!(pieces, whole, "split {split}");
        }
    }

    #[test]
    fn unmasks_rfc_example_hello() {
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }
}
