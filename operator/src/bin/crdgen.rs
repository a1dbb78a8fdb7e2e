//! Prints the StreamingPolicy CRD as YAML: `cargo run -p streamgate-operator --bin crdgen > crds/streamingpolicy.yaml`.

fn main() {
    print!("{}", streamgate_operator::crd::crd_yaml());
}
