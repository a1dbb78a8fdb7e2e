# Images of the sidecar and the operator, from one build:
#   docker build --target sidecar  -t streamgate/streamgate-sidecar:0.1.0 .
#   docker build --target operator -t streamgate/streamgate-operator:0.1.0 .
#   docker build --target demo-origin -t streamgate/streamgate-demo-origin:0.1.0 .
# Both run as an unprivileged user on a read-only root filesystem, as the injected sidecar's
# security context (Pod Security Standard "restricted") requires.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p streamgate-sidecar --bin streamgate-sidecar \
      -p streamgate-operator --bin streamgate-operator \
      -p streamgate-demo-origin --bin streamgate-demo-origin

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /src/target/release/streamgate-sidecar /usr/local/bin/streamgate-sidecar
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/streamgate-sidecar"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/streamgate-operator /usr/local/bin/streamgate-operator
USER 65532:65532
EXPOSE 8080 8443
ENTRYPOINT ["/usr/local/bin/streamgate-operator"]

# The demo streaming origin, as a stand-in streaming container behind an injected sidecar.
FROM gcr.io/distroless/cc-debian12:nonroot AS demo-origin
COPY --from=build /src/target/release/streamgate-demo-origin /usr/local/bin/streamgate-demo-origin
USER 65532:65532
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/streamgate-demo-origin", "0.0.0.0:9000"]
