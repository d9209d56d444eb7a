"""Many requests at once on a real tritonserver: batched component calls, the same image for
the same seed whatever it was batched with, progress streaming, cancellation, a bounded queue."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from asyncdiff.contract import MODEL_NAME, STREAM_MODEL_NAME
from tests.backends.test_asyncdiff_pipeline import generate, grpc_inputs, pipeline_parameters

STEPS = 8


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def _counts(client, model):
    """(rows inferred, executions) of ``model`` so far."""
    stats = client.get_inference_statistics(model_name=model).model_stats[0]
    return stats.inference_count, stats.execution_count


def _concurrently(server, seeds, **kw):
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(lambda s: generate(server, SEED=s, STEPS=STEPS, **kw), seeds))


def test_concurrent_requests_share_component_calls_and_keep_their_images(server):
    seeds = [21, 22, 23, 24]
    alone = [generate(server, SEED=s, STEPS=STEPS) for s in seeds]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = _counts(client, "unet_part_0")
        together = _concurrently(server, seeds)
        rows, execs = (a - b for a, b in zip(_counts(client, "unet_part_0"), before))
    # One request alone sends 2 rows (CFG) per call; merged calls carry more.
    assert rows == 2 * len(seeds) * STEPS
    assert rows / execs > 2.5, f"{rows} rows in {execs} executions: calls were not batched"
    for (image, latents), (ref_image, ref_latents) in zip(together, alone):
        assert np.array_equal(image, ref_image)  # pixel-identical
        assert np.abs(latents - ref_latents).max() <= 1e-4  # batched CPU kernels: ~1e-5


def test_requests_with_different_options_are_batched_together(server):
    """Continuous batching: requests at different steps, schedulers and step counts."""
    kws = [dict(SEED=31, STEPS=STEPS), dict(SEED=32, STEPS=5, SCHEDULER="euler"),
           dict(SEED=33, STEPS=11, WARMUP=3, GUIDANCE_SCALE=5.0)]
    alone = [generate(server, **kw) for kw in kws]
    with ThreadPoolExecutor(len(kws)) as pool:
        together = list(pool.map(lambda kw: generate(server, **kw), kws))
    for (image, latents), (ref_image, ref_latents) in zip(together, alone):
        assert np.array_equal(image, ref_image)
        assert np.abs(latents - ref_latents).max() <= 1e-4


def _stream(client, inputs, request_id="r"):
    """Every response of one streamed request (results or errors), in order."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(STREAM_MODEL_NAME, inputs, request_id=request_id)
        out = []
        while True:
            result, error = responses.get(timeout=120)
            out.append((result, error))
            if error is not None or result.as_numpy("IMAGE") is not None:
                return out
    finally:
        client.stop_stream()


def test_stream_sends_progress_and_previews_then_the_same_image(server):
    image, _ = generate(server, SEED=3, STEPS=STEPS)
    preview_every = grpcclient.InferInput("PREVIEW_EVERY", [1], "INT32")
    preview_every.set_data_from_numpy(np.array([3], np.int32))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        out = _stream(client, grpc_inputs(SEED=3, STEPS=STEPS) + [preview_every])
    assert all(error is None for _, error in out)
    steps = [r.as_numpy("STEP").tolist() for r, _ in out]
    assert steps == [[i, STEPS] for i in range(1, STEPS + 1)]
    previews = [i + 1 for i, (r, _) in enumerate(out[:-1]) if r.as_numpy("PREVIEW") is not None]
    assert previews == [3, 6]
    assert out[1][0].as_numpy("PREVIEW") is None and out[2][0].as_numpy("PREVIEW").shape == (16, 16, 3)
    assert np.array_equal(out[-1][0].as_numpy("IMAGE")[0], image)


def test_bad_preview_every_is_rejected(server):
    preview_every = grpcclient.InferInput("PREVIEW_EVERY", [1], "INT32")
    preview_every.set_data_from_numpy(np.array([9], np.int32))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        out = _stream(client, grpc_inputs(SEED=3, STEPS=STEPS) + [preview_every])
    assert len(out) == 1 and "PREVIEW_EVERY must be in [0, STEPS=8], got 9" in str(out[0][1])


def _component_rows(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return _counts(client, "unet_part_1")[0]


def test_abandoned_unary_request_stops_within_a_step(server):
    """A gRPC client whose deadline passes: the forwarded generation stops at its next step."""
    steps = 400  # ~10 ms a step alone: 4 s of work
    before = _component_rows(server)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer(MODEL_NAME, grpc_inputs(SEED=1, STEPS=steps), client_timeout=0.5)
    time.sleep(2.0)  # the engine notices at the next step; give it time to settle
    done = (_component_rows(server) - before) // 2
    assert done < steps / 2, f"{done} of {steps} steps ran after the client left"
    assert generate(server, SEED=1, STEPS=STEPS)[0].shape == (16, 16, 3)  # the slot is free


def test_cancelled_stream_stops_within_a_step(server):
    steps = 400
    before = _component_rows(server)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(STREAM_MODEL_NAME, grpc_inputs(SEED=1, STEPS=steps))
        responses.get(timeout=60)  # the first step is done
        client.stop_stream(cancel_requests=True)
    time.sleep(2.0)
    done = (_component_rows(server) - before) // 2
    assert done < steps / 2, f"{done} of {steps} steps ran after the stream was cancelled"


def test_a_full_engine_queue_answers_server_busy(server):
    """One request in flight, none may wait: a third concurrent request is refused at once."""
    with pipeline_parameters(server, max_batch_requests="1", max_queue_size="0"):
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda s: _try(server, s), [1, 2, 3]))
    errors = [r for r in results if isinstance(r, str)]
    assert errors and all("server busy" in e and "max_queue_size 0" in e for e in errors)
    assert any(not isinstance(r, str) for r in results)


def test_a_full_unary_queue_answers_unavailable(server):
    """The unary model's Triton queue is bounded (default_queue_policy.max_queue_size)."""
    def one_instance_no_queue(config):
        config["instance_group"][0]["count"] = 1
        config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] = 1

    with pipeline_parameters(server, model=MODEL_NAME, edit=one_instance_no_queue):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda s: _try(server, s, steps=40), [1, 2, 3, 4]))
    errors = [r for r in results if isinstance(r, str)]
    assert errors and all("Exceeds maximum queue size" in e for e in errors), results
    assert any(not isinstance(r, str) for r in results)


def _try(server, seed, steps=40):
    try:
        return generate(server, SEED=seed, STEPS=steps)
    except InferenceServerException as exc:
        return str(exc)
