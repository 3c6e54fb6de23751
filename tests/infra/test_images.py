"""Dockerfiles: pinned bases, multi-stage Rust builds, unprivileged users."""

import re

import pytest

from infra import NOMAD

IMAGES = NOMAD / "images"


def from_images(text):
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    images = []
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref))
    return images


@pytest.mark.parametrize("name", ["coordinator", "worker", "sandbox"])
def test_image_builds_in_stages_from_pinned_bases_and_runs_unprivileged(name):
    text = (IMAGES / f"{name}.Dockerfile").read_text()
    images = from_images(text)
    assert len(images) >= 2, "multi-stage build"
    for image in images:
        if image == "build":
            continue
        assert re.fullmatch(r"[a-z0-9./-]+:\d+(\.\d+)+[-a-z0-9.]*(@sha256:[0-9a-f]{64})?", image), f"unpinned base {image}"
    assert "cargo build --release --locked" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_sandbox_has_git_the_agent_cli_and_the_runner():
    text = (IMAGES / "sandbox.Dockerfile").read_text()
    assert re.search(r"\bgit\b", text)
    assert re.search(r"@anthropic-ai/claude-code@\$\{CLAUDE_CODE_VERSION\}", text)
    assert re.search(r"^ARG CLAUDE_CODE_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert "COPY --from=build /out/worker /usr/local/bin/worker" in text
    # The uid the sandbox job runs as.
    job = (NOMAD / "sandbox.nomad.hcl").read_text()
    (uid,) = re.findall(r'^\s*user\s*=\s*"(\d+)"', job, re.M)
    assert f"--uid {uid}" in text and f"USER {uid}" in text
