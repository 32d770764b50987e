//! The protocol's message model (`message::check_frame`, what the tests
//! check recorded sessions with) on arbitrary bytes, as every stage, sender
//! and link: an answer or a protocol error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cpy2py_host_fuzz::check_message(data);
});
