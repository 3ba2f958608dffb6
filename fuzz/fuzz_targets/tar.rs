#![no_main]
//! The tar paths on arbitrary bytes: the single-disk selector, the containerDisk
//! layer finder (one disk, and every file under /disk for an overlay chain) and the
//! unpacker (into a fresh temporary directory). They may refuse; they must not panic,
//! escape the directory, or read more than the header budget into memory.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use ferrydisk_common::decode::tar;
    let _ = tar::with_single_file(data, |f| -> Result<u64, tar::TarError> {
        std::io::copy(f.reader, &mut std::io::sink()).map_err(tar::TarError::Read)
    });
    {
        use ferrydisk_common::decode::containerdisk::{DiskError, DiskFinder};
        let sink = |f: tar::TarFile<'_>| -> Result<(), DiskError> {
            std::io::copy(f.reader, &mut std::io::sink()).map_err(DiskError::Read)?;
            Ok(())
        };
        let mut finder = DiskFinder::default();
        let _ = finder.scan_layer(data, sink);
        let _ = finder.scan_files(data, sink);
    }
    let Ok(dir) = tempfile::tempdir() else { return };
    let root = dir.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    let _ = tar::unpack(data, &root, 16 << 20, |_| {});
    // Nothing may appear beside the destination.
    let outside: Vec<_> = std::fs::read_dir(dir.path())
        .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(
        outside,
        vec![std::ffi::OsString::from("root")],
        "wrote outside the destination"
    );
});
