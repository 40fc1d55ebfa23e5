#![no_main]
//! See `damselfly_collector::fuzzing::remote_write`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    damselfly_collector::fuzzing::remote_write(data);
});
