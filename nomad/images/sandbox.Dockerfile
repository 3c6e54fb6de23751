# syntax=docker/dockerfile:1.7
# Sandbox image: what one agent run has. git, Node.js with the Claude Code CLI,
# and the worker binary as the in-sandbox runner (`worker runner --spec ...`).
# It runs as the unprivileged user agent (uid 10001) on a read-only root with
# tmpfs at /workspace, /tmp and /home/agent (nomad/sandbox.nomad.hcl).
#   docker build -f nomad/images/sandbox.Dockerfile -t sandbox:0.1.0 .

ARG RUST_IMAGE=rust:1.88.0-slim-bookworm
ARG NODE_IMAGE=node:22.17.0-bookworm-slim

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

FROM ${NODE_IMAGE}
ARG CLAUDE_CODE_VERSION=2.1.330
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git openssh-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && npm install --global --no-fund --no-audit "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && npm cache clean --force \
 && groupadd --gid 10001 agent \
 && useradd --uid 10001 --gid agent --home-dir /home/agent --create-home --shell /bin/sh agent \
 && mkdir -p /workspace \
 && chown agent:agent /workspace
COPY --from=build /out/worker /usr/local/bin/worker
ENV HOME=/home/agent \
    TMPDIR=/tmp \
    AO__AGENT__COMMAND=claude \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
    DISABLE_AUTOUPDATER=1
# Claude Code refuses --dangerously-skip-permissions as root.
USER 10001:10001
WORKDIR /
CMD ["worker", "runner", "--help"]
