#![no_main]
//! See `damselfly_collector::fuzzing::grpc_batch`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    damselfly_collector::fuzzing::grpc_batch(data);
});
