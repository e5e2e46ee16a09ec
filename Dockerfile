# A small, static-enough, non-root image: the release binary on distroless (no shell, no package
# manager). Build: docker build -t mtls-operator .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# cmake and clang are not needed: aws-lc-sys builds with the C compiler the image has.
COPY . .
RUN cargo build --release --locked --bin mtls-operator \
 && strip target/release/mtls-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mtls-operator /usr/local/bin/mtls-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mtls-operator"]
CMD ["run"]
