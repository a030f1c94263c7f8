"""The harness itself: an image that is broken the way real images break makes the run fail, and the
failure names the pod and what is wrong (here with the config pod, the first one of the chart)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.conftest import Images, Rendered
from tests.image.pods import ChartOnPodman, HarnessError, podman

# The first test of a session also builds the images (cold: minutes; warm: about a minute).
pytestmark = pytest.mark.timeout(1800)

BROKEN = {
    # A Python package the service imports is missing from the image.
    "missing-package": (
        "RUN rm -rf /opt/flynn/lib/python3.11/site-packages/yaml",
        ["rel-flynn-config-0", "exited with code", "No module named 'yaml'"],
    ),
    # A system package the image's entrypoint needs is missing.
    "missing-system-package": (
        "RUN rm /usr/bin/tini",
        ["rel-flynn-config-0", "did not start", "/usr/bin/tini"],
    ),
    # The process writes a file outside /data and /tmp, which a read-only root filesystem refuses.
    "writes-outside-data": (
        "RUN printf '#!/bin/sh\\nset -e\\ndate > /opt/flynn/started-at\\nexec \"$@\"\\n' > /usr/local/bin/note-start"
        " && chmod 755 /usr/local/bin/note-start\n"
        'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/note-start"]',
        ["rel-flynn-config-0", "/opt/flynn/started-at", "Read-only file system"],
    ),
}


@pytest.fixture(params=sorted(BROKEN))
def broken_image(request: pytest.FixtureRequest, images: Images, tmp_path: Path) -> Iterator[tuple[str, str]]:
    case: str = request.param
    change, _ = BROKEN[case]
    (tmp_path / "Containerfile").write_text(f"FROM {images.runtime}\nUSER 0\n{change}\nUSER 10001:10001\n")
    tag = f"localhost/flynn-broken:{case}"
    podman(
        "build", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096", "-q", "-t", tag, str(tmp_path)
    )
    try:
        yield case, tag
    finally:
        podman("rmi", "-f", tag, check=False)


def test_a_broken_image_fails_the_run_with_a_message_naming_what_is_wrong(
    broken_image: tuple[str, str], images: Images, rendered: Rendered, tmp_path: Path
) -> None:
    case, tag = broken_image
    chart = ChartOnPodman(
        rendered.docs, images={images.runtime: tag, images.voice: images.voice}, workdir=tmp_path
    )
    with pytest.raises(HarnessError) as failed, chart.running(only=("config",)):
        pass
    message = str(failed.value)
    for expected in BROKEN[case][1]:
        assert expected in message, f"{case}: {expected!r} not in the harness's message:\n{message}"
    assert chart.leftovers() == []


def test_the_unbroken_image_passes_the_same_run(images: Images, rendered: Rendered, tmp_path: Path) -> None:
    chart = ChartOnPodman(
        rendered.docs, images={images.runtime: images.runtime, images.voice: images.voice}, workdir=tmp_path
    )
    with chart.running(only=("config",)) as run:
        pod = run.pods["config"]
        assert run.state(pod)[0] == "running"
        assert run.writes_outside_volumes(pod) == []
    assert chart.leftovers() == []
