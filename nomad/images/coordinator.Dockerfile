# syntax=docker/dockerfile:1.7
# Coordinator image. Build from the repository root:
#   docker build -f nomad/images/coordinator.Dockerfile -t coordinator:0.1.0 .

ARG RUST_IMAGE=rust:1.88.0-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.11-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY shared shared
COPY coordinator coordinator
COPY worker worker
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p coordinator \
 && install -D -m 0755 target/release/coordinator /out/coordinator

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /out/coordinator /usr/local/bin/coordinator
USER 10001:10001
ENV AO__SERVER__LISTEN=0.0.0.0:8080 \
    AO__LOG__FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/coordinator"]
