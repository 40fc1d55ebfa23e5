#![no_main]
//! See `damselfly_collector::fuzzing::line_protocol`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    damselfly_collector::fuzzing::line_protocol(data);
});
