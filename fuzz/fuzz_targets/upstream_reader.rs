#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgehub::fuzzing::upstream_reader(data));
