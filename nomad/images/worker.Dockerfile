# syntax=docker/dockerfile:1.7
# Worker daemon image (the queue consumer that dispatches Nomad sandboxes).
#   docker build -f nomad/images/worker.Dockerfile -t worker:0.1.0 .

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
    cargo build --release --locked -p worker \
 && install -D -m 0755 target/release/worker /out/worker

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /out/worker /usr/local/bin/worker
USER 10001:10001
ENV AO__WORKER__LISTEN=0.0.0.0:9090 \
    AO__SANDBOX__DRIVER=nomad \
    AO__LOG__FORMAT=json
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/worker"]
