#![no_main]
//! The resume decision on arbitrary header values: it must not panic, and whatever the
//! headers say, it may only splice when the first response had a strong validator that
//! the resumed response repeats, with a range starting where the download stopped.

use ferrydisk_common::resume::{content_range, judge, Continue, Headers, Validators};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 10 || data.len() > 4096 {
        return;
    }
    let offset = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let flags = data[8];
    let text = String::from_utf8_lossy(&data[9..]).into_owned();
    let parts: Vec<&str> = text.split('\u{1}').collect();
    let field = |i: usize| parts.get(i).copied().filter(|s| !s.is_empty());
    let first = Headers {
        partial: flags & 1 != 0,
        etag: field(0),
        last_modified: field(1),
        content_length: field(2),
        content_range: field(3),
    };
    let later = Headers {
        partial: flags & 2 != 0,
        etag: field(4),
        last_modified: field(5),
        content_length: field(6),
        content_range: field(7),
    };
    let v = Validators::of(&first);
    let first_len = first.content_length.and_then(|l| l.trim().parse().ok());
    let lv = Validators::of(&later);
    if let Some(r) = later.content_range.and_then(content_range) {
        assert!(r.start <= r.end);
        assert!(r.total.is_none_or(|t| r.end < t));
    }
    match judge(&v, first_len, offset, &later) {
        Ok(c) => {
            assert!(v.strong(), "spliced without a strong validator");
            if let Some(e) = &v.etag {
                assert_eq!(lv.etag.as_ref(), Some(e), "spliced with another ETag");
                assert!(!e.starts_with("W/"));
            }
            if let Some(m) = &v.last_modified {
                assert_eq!(lv.last_modified.as_ref(), Some(m));
            }
            if v.total.is_some() {
                assert_eq!(v.total, lv.total);
            }
            match c {
                Continue::Range => {
                    assert!(later.partial);
                    let r = later.content_range.and_then(content_range);
                    assert_eq!(r.map(|r| r.start), Some(offset));
                }
                Continue::Skip => assert!(!later.partial),
            }
        }
        Err(_) => {}
    }
});
