//! Prints a CRD as YAML:
//! `cargo run -p streamgate-operator --bin crdgen > crds/streamingpolicy.yaml` and
//! `cargo run -p streamgate-operator --bin crdgen -- viewerauthentication > crds/viewerauthentication.yaml`.

fn main() {
    match std::env::args().nth(1).as_deref() {
        None | Some("streamingpolicy") => print!("{}", streamgate_operator::crd::crd_yaml()),
        Some("viewerauthentication") => {
            print!("{}", streamgate_operator::crd::viewer_auth_crd_yaml())
        }
        Some(other) => {
            eprintln!(
                "crdgen: unknown CRD {other:?}; expected streamingpolicy or viewerauthentication"
            );
            std::process::exit(2);
        }
    }
}
