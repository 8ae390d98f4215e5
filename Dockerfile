# syntax=docker/dockerfile:1
#
# The llmsched image: one static-ish binary on a distroless base, run as a non-root user.
# Its entrypoint is the EPP (`llmsched epp`), so the Gateway API Inference Extension's
# `inferencepool` chart, which only sets `args`, starts it unchanged; other subcommands run
# with an explicit command (`/llmsched envoy-config ...`, as deploy/helm/llmsched does).
#
# Build (from the repository root):
#   docker build -t ghcr.io/llmsched/llmsched:dev .
# Build arguments: RUST_VERSION (the builder's toolchain), CARGO_PROFILE (release).
#
# The binary is exactly `cargo build --release --locked -p llmsched`: default features, the
# workspace's release profile (thin LTO), the committed Cargo.lock. The builder image has
# gcc and make, which mimalloc, ring and oniguruma (C code built by their crates) need.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG CARGO_PROFILE=release
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target folders between builds; the binary is
# copied out of the target cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile "${CARGO_PROFILE}" --locked -p llmsched \
    && install -D -m 0755 "target/${CARGO_PROFILE}/llmsched" /out/llmsched \
    && /out/llmsched --version

# distroless/cc: glibc and libgcc_s (what a Rust binary built on Debian links to), CA
# certificates, no shell; the :nonroot variant's user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/llmsched /llmsched
USER 65532:65532
# 9002 ext_proc (gRPC), 9003 gRPC health, 9090 Prometheus metrics.
EXPOSE 9002 9003 9090
ENTRYPOINT ["/llmsched", "epp"]
