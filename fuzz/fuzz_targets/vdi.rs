#![no_main]
//! The vdi converter on arbitrary bytes: it may refuse, it must not panic, hang or
//! allocate from an unchecked length.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferrydisk_fuzz::run(data, ferrydisk_common::format::vdi::convert);
});
