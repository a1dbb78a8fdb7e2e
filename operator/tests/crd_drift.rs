//! The committed CRD YAML matches the Rust types.

#[test]
fn committed_crd_matches_the_types() {
    let committed = include_str!("../../crds/streamingpolicy.yaml");
    let generated = streamgate_operator::crd::crd_yaml();
    assert!(
        committed == generated,
        "crds/streamingpolicy.yaml is out of date; regenerate it with\n  cargo run -p streamgate-operator --bin crdgen > crds/streamingpolicy.yaml"
    );
}

#[test]
fn committed_viewer_authentication_crd_matches_the_types() {
    let committed = include_str!("../../crds/viewerauthentication.yaml");
    let generated = streamgate_operator::crd::viewer_auth_crd_yaml();
    assert!(
        committed == generated,
        "crds/viewerauthentication.yaml is out of date; regenerate it with\n  cargo run -p streamgate-operator --bin crdgen -- viewerauthentication > crds/viewerauthentication.yaml"
    );
}
