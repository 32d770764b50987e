//! The map keys of one frame, each made into a str once.
//!
//! Records and nested dicts repeat their keys (a list of 1,000 rows with the
//! same five field names; 100 dicts of the same 100 keys): decoding makes
//! one str per distinct short key and hands the same object out again,
//! which saves making, hashing and later freeing the others (CPython's own
//! json decoder keeps such a memo of keys for each document). A small
//! direct-mapped table indexed by a hash of the key's bytes: a key that
//! lands on a slot held by another replaces it, so a frame of many distinct
//! keys costs a hash and a compare more per key, and nothing grows; where
//! few keys repeat the table is given up (their frames then decode as they
//! would without it, but for the first keys).

use pyo3::prelude::*;

/// Slots of the table (a power of two).
const SLOTS: usize = 512;

/// Frames shorter than this are decoded without the table (its set-up
/// would cost more than a few keys save).
pub(super) const FROM_FRAME_LEN: usize = 2048;

/// Every this many keys looked up, the table is given up unless at least a
/// quarter of them were found in it.
const REVIEW_EVERY: u32 = 1024;

pub(super) struct MapKeys<'a, 'py> {
    /// (the key's UTF-8 bytes in the frame, its str); empty until first used
    slots: Vec<Option<(&'a [u8], Bound<'py, PyAny>)>>,
    looked_up: u32,
    found: u32,
}

impl<'a, 'py> MapKeys<'a, 'py> {
    pub(super) fn new() -> Self {
        Self {
            slots: Vec::new(),
            looked_up: 0,
            found: 0,
        }
    }

    /// The str of the key whose bytes are `bytes`: the one made before for
    /// the same bytes, or the one `decode` makes now (kept for the next).
    /// None: the table was given up, the caller decodes its keys itself.
    #[inline]
    pub(super) fn get_or_decode(
        &mut self,
        bytes: &'a [u8],
        decode: impl FnOnce() -> PyResult<Bound<'py, PyAny>>,
    ) -> Option<PyResult<Bound<'py, PyAny>>> {
        if self.slots.is_empty() {
            self.slots.resize_with(SLOTS, || None);
        }
        self.looked_up += 1;
        if self.looked_up == REVIEW_EVERY {
            if self.found < REVIEW_EVERY / 4 {
                return None;
            }
            self.looked_up = 0;
            self.found = 0;
        }
        let slot = &mut self.slots[slot_of(bytes)];
        if let Some((held, key)) = slot {
            if *held == bytes {
                self.found += 1;
                return Some(Ok(key.clone()));
            }
        }
        Some(decode().inspect(|key| *slot = Some((bytes, key.clone()))))
    }
}

/// The slot for a key of at most 23 bytes (a short text's): its bytes taken
/// eight at a time, each word mixed in by a multiply (as FxHash does); the
/// slot is the hash's top bits, which every bit of the key reaches (its low
/// bits miss the key's last bytes: "group0" to "group99" took 4 slots).
#[inline]
fn slot_of(bytes: &[u8]) -> usize {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut hash = bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = (hash.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    (hash >> (64 - SLOTS.trailing_zeros())) as usize
}
