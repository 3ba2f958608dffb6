#![no_main]
//! The origin rule on arbitrary `Location` and challenge values: it must not panic, a
//! resolved Location is always http(s) with a host and no user info, and credentials
//! are only ever allowed to the very origin they belong to (never to another scheme,
//! host or port, and never over plain http from https).

use ferrydisk_common::origin::{carry, challenge_params, resolve_location, Carry, Origin};

const BASES: [&str; 4] = [
    "https://reg.example/v2/disks/blobs/uploads/",
    "http://127.0.0.1:5000/v2/a/b/blobs/uploads/",
    "https://[::1]:8443/token",
    "https://user:pw@objects.example:443/bucket/key?sig=x",
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 16 << 10 {
        return;
    }
    let base = url::Url::parse(BASES[usize::from(data[0]) % BASES.len()]).expect("base");
    let text = String::from_utf8_lossy(&data[1..]);
    let _ = challenge_params(&text);
    let Ok(next) = resolve_location(&base, &text) else {
        return;
    };
    assert!(matches!(next.scheme(), "http" | "https"), "{next}");
    assert!(next.host_str().is_some_and(|h| !h.is_empty()), "{next}");
    assert!(next.username().is_empty() && next.password().is_none(), "{next}");
    let owner = Origin::of(&base).expect("origin of base");
    match carry(&owner, &next) {
        Carry::Credentials => {
            assert_eq!(Origin::of(&next).as_ref(), Some(&owner), "{next}");
            assert_eq!(next.scheme(), base.scheme());
            assert_eq!(next.port_or_known_default(), base.port_or_known_default());
        }
        Carry::Downgrade => assert!(base.scheme() == "https" && next.scheme() == "http"),
        Carry::Nothing => assert_ne!(Origin::of(&next).as_ref(), Some(&owner)),
    }
});
