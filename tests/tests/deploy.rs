//! deploy/: every manifest parses into k8s-openapi types, every container is hardened
//! (non-root 107, read-only root, no capabilities, no privilege escalation, seccomp
//! RuntimeDefault, a memory limit), and the real validators agree: kubernetes-validate
//! (strict, Kubernetes 1.35 schemas) and yamllint.

use ferrydisk_tests::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Deserialize;
use std::path::PathBuf;
use std::process::Command;

fn manifests() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["deploy", "deploy/examples"] {
        for e in std::fs::read_dir(root().join(dir)).expect("deploy dir") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn typed<T: serde::de::DeserializeOwned>(doc: &serde_json::Value, file: &str) -> T {
    serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", doc["kind"]))
}

fn check_container(c: &Container, file: &str) {
    let sc = c
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{file}/{}: no securityContext", c.name));
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "{file}/{}",
        c.name
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{file}/{}",
        c.name
    );
    let drop = sc
        .capabilities
        .as_ref()
        .and_then(|cap| cap.drop.clone())
        .unwrap_or_default();
    assert_eq!(drop, vec!["ALL".to_string()], "{file}/{}", c.name);
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
    assert!(
        limits.is_some_and(|l| l.contains_key("memory")),
        "{file}/{}: no memory limit",
        c.name
    );
}

fn check_pod(spec: &PodSpec, file: &str) {
    let sc = spec
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{file}: no pod securityContext"));
    assert_eq!(sc.run_as_non_root, Some(true), "{file}");
    assert_eq!(sc.run_as_user, Some(107), "{file}");
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{file}"
    );
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        check_container(c, file);
    }
}

#[test]
fn manifests_parse_into_kubernetes_types_and_are_hardened() {
    let mut kinds = Vec::new();
    for path in manifests() {
        let file = path
            .strip_prefix(root())
            .expect("rel")
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("read");
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc: serde_json::Value =
                serde_json::Value::deserialize(de).unwrap_or_else(|e| panic!("{file}: {e}"));
            if doc.is_null() {
                continue;
            }
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "Deployment" => {
                    let d: Deployment = typed(&doc, &file);
                    check_pod(
                        d.spec
                            .and_then(|s| s.template.spec)
                            .as_ref()
                            .expect("pod spec"),
                        &file,
                    );
                }
                "Pod" => {
                    let p: Pod = typed(&doc, &file);
                    let spec = p.spec.expect("spec");
                    assert_eq!(
                        spec.restart_policy.as_deref(),
                        Some("OnFailure"),
                        "{file}: CDI's restart policy"
                    );
                    check_pod(&spec, &file);
                }
                "Service" => drop(typed::<Service>(&doc, &file)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &file)),
                "ClusterRole" => {
                    let r: ClusterRole = typed(&doc, &file);
                    for rule in r.rules.unwrap_or_default() {
                        assert_eq!(
                            rule.verbs,
                            vec!["get".to_string()],
                            "{file}: read-only RBAC"
                        );
                    }
                }
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &file)),
                "Role" => drop(typed::<Role>(&doc, &file)),
                "RoleBinding" => drop(typed::<RoleBinding>(&doc, &file)),
                "Kustomization" => {
                    for r in doc["resources"].as_array().expect("resources") {
                        assert!(
                            path.parent()
                                .expect("dir")
                                .join(r.as_str().expect("name"))
                                .exists(),
                            "{file}: missing {r}"
                        );
                    }
                }
                other => panic!("{file}: unexpected kind {other}"),
            }
            kinds.push(kind);
        }
    }
    for k in [
        "Deployment",
        "Pod",
        "Service",
        "ClusterRole",
        "Kustomization",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in deploy/");
    }
}

#[test]
fn kubernetes_validate_and_yamllint_agree() {
    let files: Vec<PathBuf> = manifests()
        .into_iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.35.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    sh(Command::new("yamllint")
        .arg("-s")
        .arg("-c")
        .arg(root().join("deploy/.yamllint"))
        .arg(root().join("deploy")));
}
