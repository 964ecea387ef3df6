"""Batching: several requests of one size through the flow model at once, each with its own prompt, guidance, seeds,
progress and cancel; the worker's choice of which waiting jobs join a batch; and the real server batching what
waits in its queue."""

import concurrent.futures
import io
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from batching import ImageRequest
from errors import Cancelled
from serving.worker import Worker
from tests.helpers import SLOW, running_server

SIZE = dict(width=128, height=96, num_steps=4)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(a: Image.Image, b: Image.Image) -> None:
    """Equal within the rounding of matmuls of another height (measured: identical on the CPU)."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_batch_gives_each_request_its_own_image(fp8_pipeline):
    requests = [
        ImageRequest("a red fox", guidance=3.5, seed=11),
        ImageRequest("a blue bird", guidance=5.0, seed=22, num_images=2),
        ImageRequest("(a cat:1.4) on a roof", guidance=2.0, seed=33, prompt_emphasis=False),
    ]
    outcomes = fp8_pipeline.generate_batch(requests, SIZE["width"], SIZE["height"], SIZE["num_steps"])
    assert [seed for _, seed in outcomes] == [11, 22, 33]
    for request, (images, _) in zip(requests, outcomes, strict=True):
        alone, _ = fp8_pipeline.generate_images(
            request.prompt, guidance=request.guidance, seed=request.seed, num_images=request.num_images,
            prompt_emphasis=request.prompt_emphasis, **SIZE,
        )  # fmt: skip
        assert len(images) == request.num_images
        for image, single, seed in zip(images, alone, request.seeds, strict=True):
            assert_same_image(image, single)
            assert image.info["seed"] == seed
            assert f"Guidance: {request.guidance}" in image.info["parameters"]
            assert f"Seed: {seed}" in image.info["parameters"]
    # the rows really are the requests' own: guidance and seeds change the images
    other_guidance, _ = fp8_pipeline.generate_images("a blue bird", guidance=3.5, seed=22, **SIZE)
    assert np.abs(pixels(other_guidance[0]) - pixels(outcomes[1][0][0])).mean() > 0.3  # measured 0.85
    assert np.abs(pixels(outcomes[1][0][0]) - pixels(outcomes[1][0][1])).mean() > 1


def test_cancelling_one_request_of_a_batch_leaves_the_others(fp8_pipeline):
    cancel = threading.Event()
    steps: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    settled: list[int] = []

    def progress(name):
        def callback(step, total):
            steps[name].append(step)
            if name == "b" and step == 2:
                cancel.set()

        return callback

    requests = [
        ImageRequest("a red fox", seed=1, callback=progress("a")),
        ImageRequest("a blue bird", seed=2, callback=progress("b"), cancel=cancel),
        ImageRequest("a cat", seed=3, callback=progress("c")),
    ]
    outcomes = fp8_pipeline.generate_batch(requests, **SIZE, on_outcome=lambda i, outcome: settled.append(i))
    assert isinstance(outcomes[1], Cancelled) and "before step 3" in str(outcomes[1])
    assert settled[0] == 1  # the cancelled request heard of it before the batch ended
    assert sorted(settled) == [0, 1, 2]
    assert steps == {"a": [1, 2, 3, 4], "b": [1, 2], "c": [1, 2, 3, 4]}
    alone, _ = fp8_pipeline.generate_images("a cat", seed=3, **SIZE)
    assert_same_image(outcomes[2][0][0], alone[0])


def test_a_batch_whose_requests_all_stop_raises(fp8_pipeline):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        fp8_pipeline.generate_batch(
            [ImageRequest("a", seed=1, cancel=cancel), ImageRequest("b", seed=2, cancel=cancel)], **SIZE
        )
    with pytest.raises(ValueError, match="one request at a time"):
        fp8_pipeline.generate_batch([ImageRequest("a"), ImageRequest("b")], **SIZE, init_image=Image.new("RGB", (8, 8)))


class FakeRun:
    """A worker job's `run` with a batch key: records how the worker ran it."""

    log: list = []

    def __init__(self, name: str, key, rows: int = 1, gate: threading.Event | None = None):
        self.name, self.batch_key, self.rows, self.gate = name, key, rows, gate

    def __call__(self, cancel):
        if self.gate is not None:
            self.gate.wait(10)
        FakeRun.log.append([self.name])
        return self.name

    @staticmethod
    def run_batch(runs, cancels, settle):
        FakeRun.log.append([r.name for r in runs])
        return [r.name for r in runs]


def test_worker_batches_waiting_jobs_with_the_same_key_up_to_the_limit():
    FakeRun.log = []
    worker = Worker(16, max_batch=4)
    gate = threading.Event()
    worker.start()
    blocker = worker.submit(FakeRun("blocker", None, gate=gate))  # holds the worker while the queue fills
    time.sleep(0.2)
    jobs = [
        worker.submit(FakeRun("a1", "A")),
        worker.submit(FakeRun("b1", "B")),
        worker.submit(FakeRun("a2", "A", rows=2)),
        worker.submit(FakeRun("a3", "A", rows=2)),  # would make five images: waits for the next batch
        worker.submit(FakeRun("a4", "A")),
        worker.submit(lambda cancel: FakeRun.log.append(["lora change"])),  # a barrier
        worker.submit(FakeRun("a5", "A")),
    ]
    gate.set()
    assert blocker.future.result(10) == "blocker"
    assert [job.future.result(10) for job in jobs[:5]] == ["a1", "b1", "a2", "a3", "a4"]
    jobs[-1].future.result(10)
    worker.stop(10)
    assert FakeRun.log == [["blocker"], ["a1", "a2", "a4"], ["b1"], ["a3"], ["lora change"], ["a5"]]
    assert worker.completed == 8 and worker.batches == 1


def test_worker_without_batching_runs_one_at_a_time():
    FakeRun.log = []
    worker = Worker(8, max_batch=1)
    gate = threading.Event()
    worker.start()
    worker.submit(FakeRun("blocker", None, gate=gate))
    time.sleep(0.2)
    jobs = [worker.submit(FakeRun(f"a{i}", "A")) for i in range(3)]
    gate.set()
    assert [job.future.result(10) for job in jobs] == ["a0", "a1", "a2"]
    worker.stop(10)
    assert FakeRun.log == [["blocker"], ["a0"], ["a1"], ["a2"]]


def generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=120)


@pytest.mark.parametrize("max_batch", [4, 1])
def test_server_batches_waiting_requests_of_one_size(tmp_path, max_batch):
    """Three same-size requests wait behind a slow one: they run as one batch (or one by one with --max-batch 1),
    each answered with its own image, the one it gets alone; a request of another size does not join."""
    log = tmp_path / "server.log"
    size = dict(width=128, height=128, num_steps=4)  # the API's smallest
    bodies = [dict(prompt=p, seed=s, guidance=g, **size) for p, s, g in (("a fox", 5, 3.5), ("a bird", 6, 4.5),
                                                                          ("a cat", 7, 2.0))]  # fmt: skip
    other = dict(prompt="a dog", seed=8, width=144, height=128, num_steps=4)
    with running_server("--max-batch", str(max_batch), "--max-queue-size", "8", log_path=log) as server:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            slow = pool.submit(generate, server.url, SLOW)
            deadline = time.monotonic() + 30
            while server.health()["running"] == 0 and time.monotonic() < deadline:  # bounded
                time.sleep(0.05)
            futures = [pool.submit(generate, server.url, b) for b in bodies]
            time.sleep(0.3)
            odd = pool.submit(generate, server.url, other)
            deadline = time.monotonic() + 30
            while server.health()["queued"] < 4 and time.monotonic() < deadline:  # all four wait behind the slow one
                time.sleep(0.05)
            assert server.health()["queued"] == 4, (server.health(), log.read_text()[-3000:])
            answers = [f.result(120) for f in futures]
            assert slow.result(120).status_code == 200 and odd.result(120).status_code == 200
        alone = [generate(server.url, b) for b in bodies]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    for answer, single, body in zip(answers, alone, bodies, strict=True):
        assert answer.status_code == 200 and answer.headers["X-Seed"] == str(body["seed"])
        assert_same_image(Image.open(io.BytesIO(answer.content)), Image.open(io.BytesIO(single.content)))
    text = log.read_text()
    batched = re.findall(r"generated 3x 128x128 \(3 requests\)", text)
    assert len(batched) == (1 if max_batch > 1 else 0)
    assert "144x128 (" not in text  # the other size ran alone
    count = re.search(r"^flux_batched_requests_total (\S+)", metrics, re.M)
    assert count is not None and float(count.group(1)) == (3 if max_batch > 1 else 0)
