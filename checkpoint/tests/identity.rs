//! Workload identity from CRI annotations, and the safety of keys and names.

use std::collections::HashMap;
use std::path::Path;

use mig_checkpoint::{SafeName, WorkloadIdentity, annotations, workload_from_pod_name};

fn cri(namespace: &str, pod: &str, container: &str) -> HashMap<String, String> {
    HashMap::from([
        (
            annotations::SANDBOX_NAMESPACE.to_owned(),
            namespace.to_owned(),
        ),
        (annotations::SANDBOX_NAME.to_owned(), pod.to_owned()),
        (annotations::CONTAINER_NAME.to_owned(), container.to_owned()),
    ])
}

fn k8s(namespace: &str, workload: &str, container: &str) -> WorkloadIdentity {
    WorkloadIdentity::kubernetes(namespace, workload, container).unwrap()
}

#[test]
fn deployment_pod_names_are_stripped_to_the_deployment() {
    let id = WorkloadIdentity::from_annotations(
        &cri("shop", "redis-7d9f8b6c5d-x2kqz", "redis"),
        "k8s.io",
        "abc",
    )
    .unwrap();
    assert_eq!(id, k8s("shop", "redis", "redis"));
    assert_eq!(id.key(), "k8s_shop_redis_redis");
    // A replacement pod of the same Deployment (new ReplicaSet, new suffix) finds it.
    let next = WorkloadIdentity::from_annotations(
        &cri("shop", "redis-6b5c4d9f7-q8w2z", "redis"),
        "k8s.io",
        "def",
    )
    .unwrap();
    assert_eq!(next.key(), id.key());
    assert_eq!(
        workload_from_pod_name("web-app-5c98d7f6b4-k8s9w"),
        "web-app"
    );
}

#[test]
fn other_pod_names_are_kept() {
    for pod in [
        "redis-0",            // StatefulSet member: its own state
        "my-db-12",           // StatefulSet member
        "fluentd-x2kqz",      // DaemonSet pod
        "backup-v2-x7k9p",    // Job pod whose name has a short word, not a hash
        "api-abcdefgh-x2kqz", // vowels: not a pod-template-hash
        "standalone",
        "-x2kqz",
    ] {
        assert_eq!(workload_from_pod_name(pod), pod);
    }
    let id = WorkloadIdentity::from_annotations(&cri("db", "redis-0", "redis"), "k8s.io", "abc")
        .unwrap();
    assert_eq!(id, k8s("db", "redis-0", "redis"));
}

#[test]
fn workload_annotation_wins() {
    let mut a = cri("shop", "cart-x2kqz", "app");
    a.insert(annotations::WORKLOAD.to_owned(), "cart".to_owned());
    let id = WorkloadIdentity::from_annotations(&a, "k8s.io", "abc").unwrap();
    assert_eq!(id, k8s("shop", "cart", "app"));
}

#[test]
fn without_cri_annotations_the_container_id_is_used() {
    let id = WorkloadIdentity::from_annotations(&HashMap::new(), "default", "redis-test").unwrap();
    assert_eq!(
        id,
        WorkloadIdentity::container("default", "redis-test").unwrap()
    );
    assert_eq!(id.key(), "ctr_default_redis-test");

    // A pod's sandbox (pause) container has no container name.
    let mut sandbox = cri("shop", "redis-0", "x");
    sandbox.remove(annotations::CONTAINER_NAME);
    let id = WorkloadIdentity::from_annotations(&sandbox, "k8s.io", "0123abcd").unwrap();
    assert_eq!(
        id,
        WorkloadIdentity::container("k8s.io", "0123abcd").unwrap()
    );

    assert!(WorkloadIdentity::from_annotations(&HashMap::new(), "default", "").is_err());
    assert!(WorkloadIdentity::kubernetes("", "a", "b").is_err());
    assert!(WorkloadIdentity::container("ns", "a\0b").is_err());
}

fn assert_safe_key(id: &WorkloadIdentity) -> String {
    let key = id.key();
    assert!(SafeName::is_valid(&key), "{key:?} from {id}");
    assert!(!key.contains('/') && key != ".." && key != "." && !key.contains('\0'));
    assert!(key.len() <= SafeName::MAX_LEN);
    let root = Path::new("/var/lib/kubernetes-mig/checkpoints");
    assert_eq!(
        root.join(&key).parent(),
        Some(root),
        "{key:?} leaves the store"
    );
    key
}

#[test]
fn keys_are_single_safe_path_components() {
    let hostile = [
        k8s("..", "..", ".."),
        k8s("default", "../../etc", "passwd"),
        k8s("/etc", "/passwd", "/"),
        k8s("default", "a/b", "c"),
        k8s("ns", &"x".repeat(1000), "c"),
        k8s("ns", "wörkload", "c"),
        k8s("ns", ".hidden", "c"),
        k8s("ns", "-rf", "c"),
        WorkloadIdentity::container("/", "..").unwrap(),
        // Deserialised identities skip the constructors' checks.
        serde_json::from_str(r#"{"kind":"container","namespace":"a\u0000b","id":""}"#).unwrap(),
    ];
    let mut keys = std::collections::HashSet::new();
    for id in &hostile {
        let key = assert_safe_key(id);
        assert!(
            key.starts_with("hashed_") || key.starts_with("k8s_ns_"),
            "{key}"
        );
        assert!(keys.insert(key), "collision for {id}");
        assert_eq!(id.key(), id.clone().key(), "keys are stable");
    }
}

#[test]
fn keys_do_not_collide_across_field_boundaries() {
    let pairs = [
        (k8s("a_b", "c", "d"), k8s("a", "b_c", "d")),
        (
            k8s("a", "b", "c"),
            WorkloadIdentity::container("a", "b_c").unwrap(),
        ),
        (k8s("a.b", "c", "d"), k8s("a", "b.c", "d")),
    ];
    for (x, y) in pairs {
        assert_ne!(assert_safe_key(&x), assert_safe_key(&y), "{x} vs {y}");
    }
    // A readable key can never spell a hashed one: '_' never occurs inside a readable field.
    let hashed = k8s("a/b", "c", "d").key();
    let tail = hashed.strip_prefix("hashed_").unwrap();
    assert_ne!(k8s("hashed", tail, "x").key(), hashed);
}

#[test]
fn safe_names_reject_what_could_escape() {
    for bad in [
        "", ".", "..", "a/b", "/abs", "../x", ".hidden", "-opt", "a\0b", "a b", "ü",
    ] {
        assert!(SafeName::new(bad).is_err(), "{bad:?} accepted");
    }
    assert!(SafeName::new("x".repeat(201)).is_err());
    for good in ["data", "my-vol.1", "_x", "A9", &"x".repeat(200)] {
        assert_eq!(SafeName::new(good).unwrap().as_str(), good);
    }
    assert!(serde_json::from_str::<SafeName>(r#""../x""#).is_err());
    let err = SafeName::new("a/b").unwrap_err().to_string();
    assert!(err.contains("\"a/b\""), "{err}");
}
