//! A byte stream read as frames (`frame::read_frame`, with a small limit so
//! that oversized prefixes are exercised), every frame decoded as a value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cpy2py_host_fuzz::check_stream(data);
});
