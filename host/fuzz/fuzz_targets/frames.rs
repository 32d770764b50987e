//! A byte stream read as frames (`frame::read_frame`, with a small limit so
//! that oversized prefixes are exercised), every frame decoded as a value;
//! and the same stream delivered in pieces, as a pipe may (the piece sizes
//! come from the input's first bytes), must give the same frames.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = cpy2py_host_fuzz::check_stream(data);
    let pieces = &data[..data.len().min(4)];
    assert_eq!(cpy2py_host_fuzz::check_stream_in_pieces(data, pieces), frames);
});
