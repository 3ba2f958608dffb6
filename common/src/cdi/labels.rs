//! Image ENV -> PVC labels (docs/cdi-contract.md section 1.9), exactly as CDI rewrites them.

use std::collections::BTreeMap;

const MARK: &str = "KUBEVIRT_IO_";

/// `INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small` ->
/// `instancetype.kubevirt.io/default-instancetype: u1.small`.
pub fn from_env<'a>(env: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in env {
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let Some(at) = key.find(MARK) else { continue };
        let prefix = key[..at].trim_end_matches('_');
        let suffix = &key[at + MARK.len()..];
        let mut label = String::new();
        if !prefix.is_empty() {
            label.push_str(&prefix.split('_').collect::<Vec<_>>().join("."));
            label.push('.');
        }
        label.push_str("kubevirt.io/");
        label.push_str(&suffix.replace('_', "-"));
        // Image text: no control characters reach the termination message or logs.
        out.insert(
            crate::error::sanitize(&label.to_lowercase()),
            crate::error::sanitize(value),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let l = from_env([
            "KUBEVIRT_IO_TEST=a",
            "KUBEVIRT_IO_TEST_TEST=b",
            "TEST_TEST_KUBEVIRT_IO_TEST_TEST=c",
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small",
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE_KIND=VirtualMachineClusterPreference",
            "PATH=/bin",
            "KUBEVIRT_IO_NOVALUE",
        ]);
        assert_eq!(l["kubevirt.io/test"], "a");
        assert_eq!(l["kubevirt.io/test-test"], "b");
        assert_eq!(l["test.test.kubevirt.io/test-test"], "c");
        assert_eq!(
            l["instancetype.kubevirt.io/default-instancetype"],
            "u1.small"
        );
        assert_eq!(
            l["instancetype.kubevirt.io/default-preference-kind"],
            "VirtualMachineClusterPreference"
        );
        assert_eq!(l.len(), 5);
    }
}
