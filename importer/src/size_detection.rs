//! `importer size-detection` (also started as `cdi-image-size-detection`): CDI's
//! size-detection pod for clones of kubevirt content (`tools/cdi-image-size-detection`).
//! The clone controller runs it on the source PVC with `-image-path /data/disk.img` and
//! reads the image's virtual size from the termination message; the exit code says what
//! failed. The size comes from our own format probe (`format::probe`), never qemu-img.

use crate::cli::SizeArgs;
use ferrydisk_common::format::probe;
use std::os::unix::fs::OpenOptionsExt;

/// CDI's size-detection exit codes (`pkg/controller/common`: NoErr, ErrBadArguments,
/// ErrInvalidFile, ErrInvalidPath, ErrBadTermFile).
pub const ERR_BAD_ARGUMENTS: i32 = 1;
pub const ERR_INVALID_FILE: i32 = 2;
pub const ERR_INVALID_PATH: i32 = 3;
pub const ERR_BAD_TERM_FILE: i32 = 4;

/// The size qemu-img (and so CDI) reports: qemu's block layer counts whole 512-byte
/// sectors, so a raw file of 10 MiB + 1000 bytes is 10,486,784 bytes to it. The clone
/// controller sizes the target volume from this number.
pub fn qemu_size(size: u64) -> u64 {
    size.div_ceil(512).saturating_mul(512)
}

pub fn run(args: SizeArgs) -> i32 {
    if args.image_path.is_empty() {
        tracing::error!("One or more mandatory parameters are missing");
        return ERR_BAD_ARGUMENTS;
    }
    tracing::info!("Initializing size-detection pod");
    // CDI parses `scheme + path` as a URL and hands it to qemu-img; only local files
    // are images a size-detection pod can see.
    let url = format!("{}{}", args.scheme, args.image_path);
    let path = match url::Url::parse(&url) {
        Ok(u) if u.scheme() == "file" => match u.to_file_path() {
            Ok(p) => p,
            Err(()) => {
                tracing::error!(url = %url, "Unable to parse the provided URL: not a local path");
                return ERR_INVALID_PATH;
            }
        },
        Ok(u) => {
            tracing::error!(
                scheme = u.scheme(),
                "Unable to parse the provided URL: only file:// images can be sized here"
            );
            return ERR_INVALID_PATH;
        }
        Err(e) => {
            tracing::error!(error = %e, "Unable to parse the provided URL");
            return ERR_INVALID_PATH;
        }
    };
    let probed = std::fs::File::open(&path)
        .map_err(|e| e.to_string())
        .and_then(|mut f| probe::probe(&mut f).map_err(|e| e.to_string()));
    let probed = match probed {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "Unable to extract information from the image");
            return ERR_INVALID_FILE;
        }
    };
    let size = qemu_size(probed.virtual_size);
    tracing::info!(path = %path.display(), format = %probed.format.name(), virtual_size = size, "image size");
    // CDI writes the bare number (one line, mode 0600).
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&args.termination_log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, size.to_string().as_bytes()));
    if let Err(e) = written {
        tracing::error!(path = %args.termination_log.display(), error = %e, "Unable to write to termination file");
        return ERR_BAD_TERM_FILE;
    }
    tracing::info!("Size-detection binary has completed");
    0
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_round_up_to_whole_sectors_as_qemu_img() {
        assert_eq!(super::qemu_size(10_486_760), 10_486_784);
        assert_eq!(super::qemu_size(10 << 20), 10 << 20);
        assert_eq!(super::qemu_size(0), 0);
        assert_eq!(super::qemu_size(1), 512);
    }
}
