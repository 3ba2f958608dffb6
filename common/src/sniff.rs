//! Magic bytes -> [`Format`]. The probes mirror what qemu-img and CDI's stream readers
//! recognise, so a file we call raw is one qemu-img would also convert as raw.

/// How many leading bytes [`sniff`] wants to see (a tar header is 512 bytes; vdi's magic
/// sits at 0x40).
pub const SNIFF_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Tar,
    Qcow2,
    Vmdk,
    Vhdx,
    Vdi,
    /// VHD with a header copy at offset 0 (dynamic/differencing). A fixed VHD is raw
    /// data plus a footer and is detected as raw, as qemu-img's probe does.
    Vpc,
    /// A disk format qemu-img knows but CDI does not accept (qed, luks, parallels,
    /// bochs, cloop, VMware's old COWD sparse): refused, never imported as raw.
    Foreign(&'static str),
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Bzip2 => "bzip2",
            Format::Tar => "tar",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Foreign(name) => name,
            Format::Raw => "raw",
        }
    }

    /// Compression layers are peeled off before the disk format is looked at.
    pub fn is_compression(self) -> bool {
        matches!(
            self,
            Format::Gzip | Format::Xz | Format::Zstd | Format::Bzip2
        )
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies `head`, the first up-to-[`SNIFF_LEN`] bytes of a stream.
pub fn sniff(head: &[u8]) -> Format {
    let at = |off: usize, magic: &[u8]| {
        head.len() >= off + magic.len() && &head[off..off + magic.len()] == magic
    };
    if at(0, &[0x1f, 0x8b]) {
        return Format::Gzip;
    }
    if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        return Format::Xz;
    }
    if head.len() >= 4 {
        let m = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        // A zstd frame, or a skippable frame (pzstd and seekable zstd start with one).
        if m == 0xFD2F_B528 || (0x184D_2A50..=0x184D_2A5F).contains(&m) {
            return Format::Zstd;
        }
    }
    if is_bzip2(head) {
        return Format::Bzip2;
    }
    if at(0, b"QFI\xfb") {
        return Format::Qcow2;
    }
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") || is_vmdk_descriptor(head) {
        return Format::Vmdk;
    }
    if at(0, b"vhdxfile") {
        return Format::Vhdx;
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Format::Vdi;
    }
    if at(0, b"conectix") {
        return Format::Vpc;
    }
    // Magics of qemu's other block drivers, as its probes see them.
    for (off, magic, name) in [
        (0, &b"QED\0"[..], "qed"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
        (0, b"COWD", "vmdk (COWD)"),
        (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    ] {
        if at(off, magic) {
            return Format::Foreign(name);
        }
    }
    if is_tar(head) {
        return Format::Tar;
    }
    Format::Raw
}

/// qemu's `vmdk_probe` for a text descriptor: comment lines (`#`) and blank lines, then
/// `version=1`, `2` or `3` on a line of its own (LF or CRLF). Such a file names its
/// extents as other files; imported as raw, the disk would hold the descriptor's text.
pub(crate) fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let mut p = 0;
    while p < head.len() {
        match head[p] {
            b'#' => {
                while p < head.len() && head[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < head.len() && head[p] == b' ' {
                    p += 1;
                }
                if p < head.len() && head[p] == b'\r' {
                    p += 1;
                }
                if p >= head.len() || head[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let Some(rest) = head[p..].strip_prefix(b"version=") else {
                    return false;
                };
                return matches!(
                    rest,
                    [b'1'..=b'3', b'\n', ..] | [b'1'..=b'3', b'\r', b'\n', ..]
                );
            }
        }
    }
    false
}

fn is_bzip2(head: &[u8]) -> bool {
    if head.len() < 10 || &head[..3] != b"BZh" || !(b'1'..=b'9').contains(&head[3]) {
        return false;
    }
    // First block magic (pi) or the end-of-stream magic (sqrt(pi)) of an empty stream.
    let m = &head[4..10];
    m == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59] || m == [0x17, 0x72, 0x45, 0x38, 0x50, 0x90]
}

/// A ustar/GNU magic, or (v7 tar) a header whose checksum field matches its bytes.
fn is_tar(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    if &head[257..262] == b"ustar" {
        return true;
    }
    if head[0] == 0 {
        return false;
    }
    let field = &head[148..156];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect::<String>()
        .trim()
        .to_string();
    let Ok(stored) = u32::from_str_radix(&text, 8) else {
        return false;
    };
    let sum: u32 = head[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    stored == sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(prefix: &[u8], off: usize) -> Vec<u8> {
        let mut v = vec![0u8; SNIFF_LEN];
        v[off..off + prefix.len()].copy_from_slice(prefix);
        v
    }

    #[test]
    fn recognises_magics() {
        assert_eq!(sniff(&padded(&[0x1f, 0x8b, 8], 0)), Format::Gzip);
        assert_eq!(sniff(&padded(b"\xfd7zXZ\0", 0)), Format::Xz);
        assert_eq!(sniff(&padded(&[0x28, 0xb5, 0x2f, 0xfd], 0)), Format::Zstd);
        assert_eq!(sniff(&padded(&[0x50, 0x2a, 0x4d, 0x18], 0)), Format::Zstd);
        assert_eq!(sniff(&padded(b"BZh91AY&SY", 0)), Format::Bzip2);
        assert_eq!(sniff(&padded(b"QFI\xfb", 0)), Format::Qcow2);
        assert_eq!(sniff(&padded(b"KDMV", 0)), Format::Vmdk);
        // Descriptors as qemu probes them: comments and blank lines, then version=N.
        for d in [
            &b"version=1\nCID=fffffffe\n"[..],
            b"# a comment\n  \n   \r\nversion=3\r\nencoding=\"UTF-8\"\n",
            b"#\n#\nversion=2\n",
        ] {
            assert_eq!(
                sniff(&padded(d, 0)),
                Format::Vmdk,
                "{:?}",
                String::from_utf8_lossy(d)
            );
        }
        assert_eq!(sniff(&padded(b"version=4\n", 0)), Format::Raw);
        assert_eq!(sniff(&padded(b"hello\nversion=1\n", 0)), Format::Raw);
        assert_eq!(sniff(&padded(b"vhdxfile", 0)), Format::Vhdx);
        assert_eq!(
            sniff(&padded(&0xbeda107f_u32.to_le_bytes(), 0x40)),
            Format::Vdi
        );
        assert_eq!(sniff(&padded(b"conectix", 0)), Format::Vpc);
        assert_eq!(sniff(&padded(b"QED\0", 0)), Format::Foreign("qed"));
        assert_eq!(sniff(&padded(b"LUKS\xba\xbe", 0)), Format::Foreign("luks"));
        assert_eq!(sniff(&padded(b"ustar", 257)), Format::Tar);
        assert_eq!(sniff(&[0u8; SNIFF_LEN]), Format::Raw);
        assert_eq!(sniff(b"BZh"), Format::Raw);
        assert_eq!(sniff(&[]), Format::Raw);
    }

    #[test]
    fn v7_tar_by_checksum() {
        let mut h = vec![0u8; 512];
        h[..8].copy_from_slice(b"disk.img");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum::<u32>() + 8 * 32;
        let field = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(field.as_bytes());
        assert_eq!(sniff(&h), Format::Tar);
        h[0] = b'x'; // checksum no longer matches
        assert_eq!(sniff(&h), Format::Raw);
    }
}
