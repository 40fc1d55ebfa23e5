#![no_main]
//! See `damselfly_collector::fuzzing::wal_segment`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    damselfly_collector::fuzzing::wal_segment(data);
});
