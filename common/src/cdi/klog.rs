//! CDI's images start their Go binaries with klog flags (`-alsologtostderr`, and the
//! controller adds `-v=<n>`). Our binaries log to stderr anyway, so the flags that only
//! steer klog's output are accepted and dropped before argument parsing; `-v` is kept
//! (it sets the log level).

use std::ffi::OsString;

/// klog flags without meaning here, in their Go spellings (`-f`, `--f`, `-f=x`, `--f=x`).
const NOOP: &[&str] = &[
    "alsologtostderr",
    "logtostderr",
    "stderrthreshold",
    "add_dir_header",
    "skip_headers",
    "one_output",
];

/// `args` without the klog output flags (argv[0] is kept as it is).
pub fn strip_output_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    for (i, a) in args.into_iter().enumerate() {
        if i > 0 && is_noop(&a) {
            continue;
        }
        out.push(a);
    }
    out
}

fn is_noop(a: &OsString) -> bool {
    let Some(s) = a.to_str() else { return false };
    let Some(name) = s.strip_prefix("--").or_else(|| s.strip_prefix('-')) else {
        return false;
    };
    let name = name.split_once('=').map_or(name, |(n, _)| n);
    NOOP.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_klog_output_flags_only() {
        let args: Vec<OsString> = [
            "cdi-importer",
            "-alsologtostderr",
            "-v=3",
            "--logtostderr=true",
            "--endpoint",
            "x",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let kept: Vec<String> = strip_output_flags(args)
            .into_iter()
            .map(|a| a.into_string().expect("utf8"))
            .collect();
        assert_eq!(kept, ["cdi-importer", "-v=3", "--endpoint", "x"]);
    }
}
