//! Where an upload goes: the per-PVC upload server's Service (docs/cdi-contract.md sections 4.1 and
//! 5.4) and the path, rewritten for archive PVCs.

/// `cdi-upload-<pvc>` as a Service name: dots to dashes; over 63 characters, the first
/// 50, a dash, the FNV-32a of the whole name in hex, and `-cdi`.
pub fn service_name(pvc: &str) -> String {
    let name = format!("cdi-upload-{pvc}").replace('.', "-");
    if name.len() <= 63 {
        return name;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{}-{h:08x}-cdi", &name[..50])
}

/// The upstream base URL from a template with `{service}`, `{pvc}` and `{namespace}`.
pub fn base_url(template: &str, namespace: &str, pvc: &str) -> String {
    template
        .replace("{service}", &service_name(pvc))
        .replace("{pvc}", pvc)
        .replace("{namespace}", namespace)
}

/// A PVC whose content-type annotation names nothing an upload can be.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("upload content-type {0} is invalid")]
pub struct InvalidContentType(pub String);

/// CDI's rewrite by the PVC's content type: archive PVCs take the archive endpoint.
pub fn path_for(content_type: &str, request_path: &str) -> Result<String, InvalidContentType> {
    let resumable = request_path.starts_with(ferrydisk_common::cdi::upload::RESUMABLE);
    match content_type {
        "" | "kubevirt" => Ok(request_path.to_string()),
        "archive" if resumable => Err(InvalidContentType(
            "archive (an archive upload is not resumable: use /v1beta1/upload)".into(),
        )),
        "archive" if request_path.contains("alpha") => Ok("/v1alpha1/upload-archive".into()),
        "archive" => Ok("/v1beta1/upload-archive".into()),
        other => Err(InvalidContentType(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(service_name("fedora.disk"), "cdi-upload-fedora-disk");
        let long = service_name(&"a".repeat(80));
        assert_eq!(long.len(), 50 + 1 + 8 + 4);
        assert!(long.ends_with("-cdi"));
        assert_eq!(
            base_url("https://{service}.{namespace}.svc:8443", "ns", "p"),
            "https://cdi-upload-p.ns.svc:8443"
        );
        assert_eq!(
            path_for("archive", "/v1alpha1/upload"),
            Ok("/v1alpha1/upload-archive".into())
        );
        assert_eq!(
            path_for("", "/v1beta1/upload-async"),
            Ok("/v1beta1/upload-async".into())
        );
        assert!(path_for("weird", "/v1beta1/upload").is_err());
        assert!(path_for("archive", "/v1beta1/upload-resumable/ab").is_err());
        assert_eq!(
            path_for("kubevirt", "/v1beta1/upload-resumable/ab"),
            Ok("/v1beta1/upload-resumable/ab".into())
        );
    }
}
