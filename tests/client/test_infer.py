"""client/: request building, CLI parsing, the perf recipe's parsers and data. No server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from asyncdiff.contract import INPUT_BY_NAME, INPUTS, OUTPUTS, Request
from client.__main__ import Spinner, load_image, params_from_args, parse_args, save_png
from client.infer import (GenerationParams, auto_upscale_factor, build_request, default_url,
                          input_arrays, upscale)
from client.perf import run_perf

REPO = Path(__file__).resolve().parents[2]
NAME = {f.field: f.name for f in INPUTS}  # Request field -> Triton input name
FULL = GenerationParams("a handwritten digit 7 ✓", negative_prompt="blurry", seed=3, steps=25,
                        guidance_scale=3.0, warmup=1, scheduler="euler", num_images=2, height=16,
                        width=24, strength=0.5)


def _described(protocol: str, params: GenerationParams) -> dict[str, tuple[str, list[int]]]:
    inputs, _ = build_request(params, protocol)
    return {t.name(): (t.datatype(), t.shape()) for t in inputs}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_all_inputs_named_typed_and_shaped(protocol):
    described = _described(protocol, FULL)
    assert described == {f.name: (f.dtype, [1]) for f in INPUTS}
    assert {f.dtype for f in INPUTS} == {"BYTES", "INT64", "INT32", "FP32"}
    _, outputs = build_request(FULL, protocol)
    assert [o.name() for o in outputs] == [f.name for f in OUTPUTS]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_only_given_optionals_are_sent(protocol):
    assert set(_described(protocol, GenerationParams("x"))) == {NAME["prompt"]}
    assert set(_described(protocol, GenerationParams("x", seed=0, guidance_scale=0.0))) == {
        NAME["prompt"], NAME["seed"], NAME["guidance_scale"]}  # zero is a value, not "unset"


def test_arrays_dtypes_and_utf8():
    arrays = {INPUT_BY_NAME[name].field: a for name, a in input_arrays(FULL).items()}
    assert arrays["prompt"].dtype == np.object_
    assert arrays["prompt"][0] == "a handwritten digit 7 ✓".encode()
    assert arrays["seed"].dtype == np.int64 and arrays["seed"].tolist() == [3]
    assert arrays["steps"].dtype == np.int32 and arrays["warmup"].dtype == np.int32
    assert arrays["guidance_scale"].dtype == np.float32
    assert all(a.shape == (1,) for a in arrays.values())
    # The client's request is the contract's: same fields (and the init image, not a scalar),
    # and what it sends parses back.
    assert list(GenerationParams.__dataclass_fields__) == [*Request.__dataclass_fields__,
                                                           "init_image"]
    scalars = {k: v for k, v in vars(FULL).items() if k != "init_image"}
    assert Request.from_inputs(input_arrays(FULL).get, Request()) == Request(**scalars)


def test_init_image_goes_as_uint8_and_sets_the_size(tmp_path):
    from PIL import Image

    image = np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3)
    Image.fromarray(image).save(tmp_path / "init.png")
    args = parse_args(["x", "--init-image", str(tmp_path / "init.png"), "--strength", "0.6"])
    params = params_from_args(args, None, load_image(args.init_image))
    assert (params.height, params.width, params.strength) == (16, 24, 0.6)
    described = _described("grpc", params)
    assert described["INIT_IMAGE"] == ("UINT8", [16, 24, 3])
    assert np.array_equal(input_arrays(params)["INIT_IMAGE"], image)


def test_grpc_request_carries_bytes_payload():
    inputs, _ = build_request(GenerationParams("héllo", seed=2**40), "grpc")
    raw = {t.name(): t._get_content() for t in inputs}
    assert raw[NAME["prompt"]] == len("héllo".encode()).to_bytes(4, "little") + "héllo".encode()
    assert np.frombuffer(raw[NAME["seed"]], np.int64).tolist() == [2**40]


def test_default_url_per_protocol(monkeypatch):
    assert default_url("grpc", {}) == "127.0.0.1:8001"
    assert default_url("http", {}) == "127.0.0.1:8000"
    assert default_url("grpc", {"GRPC_PORT": "9001"}) == "127.0.0.1:9001"
    monkeypatch.setenv("HTTP_PORT", "9000")
    assert parse_args(["p", "--protocol", "http"]).url == "127.0.0.1:9000"


def test_cli_defaults_leave_optionals_unset(monkeypatch):
    monkeypatch.delenv("GRPC_PORT", raising=False)
    args = parse_args(["a handwritten digit 7"])
    assert (args.protocol, args.url, args.out, args.timeout, args.upscale) == (
        "grpc", "127.0.0.1:8001", Path("image.png"), 300.0, 0)
    assert params_from_args(args) == GenerationParams("a handwritten digit 7")


def test_cli_maps_every_option():
    args = parse_args(["p", "--negative-prompt", "n", "--seed", "5", "--steps", "10",
                       "--guidance-scale", "2.5", "--warmup", "2", "--scheduler", "dpmsolver++",
                       "--url", "h:1", "--out", "o.png", "--upscale", "4"])
    assert params_from_args(args) == GenerationParams("p", "n", 5, 10, 2.5, 2, "dpmsolver++")
    assert (args.url, args.out, args.upscale) == ("h:1", Path("o.png"), 4)


@pytest.mark.parametrize("bad", [["p", "--upscale", "-1"], ["p", "--timeout", "0"],
                                 ["p", "--protocol", "ftp"], ["p", "--seed", "x"]])
def test_cli_rejects_bad_options(bad):
    with pytest.raises(SystemExit):
        parse_args(bad)


@pytest.mark.parametrize("args, says", [
    (["--strength", "0.5"], "--strength (STRENGTH) applies to img2img only: give --init-image too"),
    (["--preview-every", "2", "--no-stream"], "--preview-every needs the gRPC stream: drop --no-stream"),
    (["--preview-every", "2", "--protocol", "http"],
     "--preview-every needs the gRPC stream: drop --protocol http"),
])
def test_cli_refuses_options_that_would_do_nothing(args, says, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["p", *args])
    assert info.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("name, content, says", [
    ("missing.png", None, "No such file or directory"),
    ("notes.png", b"not an image", "not an image file Pillow can read"),
])
def test_unreadable_init_image_is_named_before_any_connection(tmp_path, capsys, name, content, says):
    from client.__main__ import main

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    # Nothing listens at this URL: the file's problem must be the one reported.
    assert main(["p", "--init-image", str(path), "--url", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --init-image {path}: {says}"


def test_upscale_and_png(tmp_path):
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    assert auto_upscale_factor(image) == 16
    assert auto_upscale_factor(np.zeros((512, 512, 3), np.uint8)) == 1
    big = upscale(image, 3)
    assert big.shape == (48, 48, 3) and (big[::3, ::3] == image).all()
    save_png(image, tmp_path / "sub" / "x.png", 0)
    from PIL import Image

    with Image.open(tmp_path / "sub" / "x.png") as png:
        assert png.size == (256, 256)
        assert (np.asarray(png)[::16, ::16] == image).all()


def test_spinner_writes_one_line_when_not_a_tty():
    stream = io.StringIO()
    with Spinner("waiting", stream=stream):
        pass
    assert stream.getvalue() == "waiting ...\n"


SAMPLE_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait\n"
    "1,87.8697,10,2736,128,47,8112,297,5,9687,16085,18117,28463,11338,15,11278\n"
    "2,112.74,10,4317,4896,27,8041,398,4,16493,26599,31859,52861,17697,14,17599\n")

SAMPLE_STDOUT = """\
Request concurrency: 1
  Client: 
    Throughput: 87.8697 infer/sec
  Server: 
    Avg request latency: 8589 usec (overhead 8245 usec + queue 21 usec + compute 323 usec)

  Composing models: 
  unet_part_0, version: 1
      Inference count: 3172
      Execution count: 3172
      Successful request count: 3172
      Avg request latency: 347 usec (overhead 3 usec + queue 21 usec + compute input 17 usec + compute infer 224 usec + compute output 81 usec)
  unet_part_1, version: 
      Inference count: 3170
      Execution count: 1585
      Successful request count: 3170
      Avg request latency: 1200 usec (overhead 3 usec + queue 400 usec + compute input 17 usec + compute infer 700 usec + compute output 80 usec)

Request concurrency: 2
  Client: 
    Throughput: 112.74 infer/sec

Inferences/Second vs. Client Average Batch Latency
Concurrency: 1, throughput: 87.8697 infer/sec, latency 11338 usec
"""


def test_parse_csv():
    levels = run_perf.parse_csv(SAMPLE_CSV)
    assert [lv.concurrency for lv in levels] == [1, 2]
    first = levels[0]
    assert first.throughput == pytest.approx(87.8697)
    assert (first.p50_ms, first.p99_ms, first.avg_ms) == pytest.approx((9.687, 28.463, 11.338))
    plain = SAMPLE_CSV.replace(",Avg latency,request/response,response wait", "")
    plain = "\n".join(",".join(line.split(",")[:13]) for line in plain.splitlines())
    assert run_perf.parse_csv(plain)[1].avg_ms is None  # without --verbose-csv


def test_parse_composing_models():
    parsed = run_perf.parse_composing(SAMPLE_STDOUT)
    assert 2 not in parsed  # no composing section at that level
    part0, part1 = parsed[1]
    assert (part0.model, part0.inference_count, part0.avg_latency_ms) == ("unet_part_0", 3172, 0.347)
    assert (part1.model, part1.queue_ms, part1.compute_infer_ms) == ("unet_part_1", 0.4, 0.7)
    table = run_perf.format_table([run_perf.parse_csv(SAMPLE_CSV)[0]])
    assert "87.870" in table and "9.7" in table and "28.5" in table


def test_perf_command_is_fixed_length(tmp_path):
    args = run_perf.parse_args(["--url", "h:1", "--bls-composing-models", "unet_part_0,unet_part_1",
                                "--", "--request-rate-range", "1"])
    assert args.concurrency_levels == [1, 2, 4]
    args.input_data = tmp_path / "p.json"
    cmd = run_perf.perf_command(Path("pa"), args, 2, tmp_path / "x.csv")
    joined = " ".join(cmd)
    for part in ("-m asyncdiff", "-u h:1", "-i grpc", "--concurrency-range 2",
                 "--measurement-mode time_windows", "--max-trials 3", "--stability-percentage 999",
                 "--bls-composing-models unet_part_0,unet_part_1",
                 f"--input-data {tmp_path / 'p.json'}"):
        assert part in joined
    assert cmd[-2:] == ["--request-rate-range", "1"]
    with pytest.raises(SystemExit):
        run_perf.parse_args(["--concurrency", "1,x"])


def test_library_dir_links_what_perf_analyzer_needs(tmp_path):
    lib = run_perf.library_dir(tmp_path)
    for soname in ("libcudart.so.12", "libb64.so.0d"):
        link = lib / soname
        if link.is_symlink():
            assert link.resolve().is_file()
    run_perf.library_dir(tmp_path)  # idempotent


def test_missing_perf_analyzer_is_a_clear_error(monkeypatch, capsys, tmp_path):
    def missing():
        raise run_perf.PerfError("perf_analyzer not found")

    monkeypatch.setattr(run_perf, "find_perf_analyzer", missing)
    assert run_perf.main(["--concurrency", "1"]) == 1
    assert "perf_analyzer not found" in capsys.readouterr().err


def test_perf_input_data_matches_perf_analyzer_schema():
    """perf_analyzer --input-data: {"data": [step, ...]}; a step maps input names to
    a flat list (shape from the config, here dims [1]). BYTES inputs take JSON strings."""
    doc = json.loads(json.dumps(run_perf.input_data()))
    assert set(doc) == {"data"} and len(doc["data"]) == 10
    kinds = {"BYTES": str, "FP32": float, "INT32": int, "INT64": int}
    for step in doc["data"]:
        assert NAME["prompt"] in step and set(step) <= set(INPUT_BY_NAME)
        for name, value in step.items():
            assert isinstance(value, list) and len(value) == 1, name
            assert isinstance(value[0], kinds[INPUT_BY_NAME[name].dtype]), name
        # Each step is a valid request.
        Request.from_inputs(lambda n: None if n not in step else INPUT_BY_NAME[n].encode(step[n][0]),
                            Request())
    assert len({s[NAME["prompt"]][0] for s in doc["data"]}) == len(doc["data"])


def test_compose_reserves_gpus_and_shm():
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["asyncdiff"]
    assert service["shm_size"] == "8gb"
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert {p.split(":")[-1] for p in service["ports"]} == {"8000", "8001", "8002"}
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "tritonserver:24.10-py3" in dockerfile
