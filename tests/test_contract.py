"""The serving contract: request parsing and validation, and pipeline parameters that survive
config -> parameters -> config unchanged."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from asyncdiff.contract import (
    STREAM_INPUTS, INPUT_BY_NAME, INPUTS, MAX_SEED, SIZE_INPUTS, TRITON_PARAMETERS, NetworkNames,
    PipelineParams, Request, add_request_arguments, error_kind, model_inputs,
)
from export import repository as repo_mod
from export.triton_config import parse_config, to_pbtxt

# Every field away from its default, so a field that is dropped or mis-parsed shows.
PARAMS = PipelineParams(
    component_models=("unet_part_0", "unet_part_1", "unet_part_2"), latent_shape=(4, 96, 80),
    image_shape=(768, 640, 3), vae_scaling_factor=0.18215,
    text_encoder=NetworkNames("clip", "ids", "states"), vae_decoder=NetworkNames("vae", "z", "x"),
    defaults=Request(negative_prompt="blurry, ünïcode", seed=7, steps=30, guidance_scale=7.5,
                     warmup=3, scheduler="euler"),
    partition_file="p.json", scheduler_config_file="sched/s.json", tokenizer_dir="tok",
    component_timeout_s=12.5, device="cuda:1",
    dtypes={"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
            "noise_pred": "float16", "ids": "int64", "states": "float16", "z": "float32",
            "x": "float32"},
    gpus=(1, 2, 3))


def parameters_of(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_config_parameters_config_round_trip():
    config = repo_mod.pipeline_config(PARAMS)
    parsed = parse_config(to_pbtxt(config))
    assert parsed == config
    params = repo_mod.pipeline_params(parsed)
    assert params == PARAMS
    written = parameters_of(parsed)
    # Everything written is a contract field, except Triton's own switch.
    assert {k: v for k, v in written.items() if k not in TRITON_PARAMETERS} == params.to_parameters()
    assert written["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"  # GPU pipeline: keep tensors on the GPU
    assert repo_mod.pipeline_config(params) == config


def test_pipeline_config_io_is_the_contracts():
    """The engine takes the contract's inputs plus PREVIEW_EVERY and answers progress too;
    the unary model in front of it has exactly the contract's IO and no parameters."""
    params = dataclasses.replace(PARAMS, device="cpu", max_batch_requests=3, max_queue_size=5)
    engine, unary = repo_mod.pipeline_config(params), repo_mod.unary_config(params)
    assert engine.model_transaction_policy.decoupled and not unary.model_transaction_policy.decoupled
    assert [(i.name, i.optional) for i in engine.input] == \
        [(f.name, not f.required) for f in STREAM_INPUTS]
    assert [(i.name, i.optional) for i in unary.input] == [(f.name, not f.required) for f in INPUTS]
    # [NUM_IMAGES, H, W, 3] / [NUM_IMAGES, C, h, w] at any served size; PREVIEW: the first image
    assert {o.name: list(o.dims) for o in engine.output} == {
        "IMAGE": [-1, -1, -1, 3], "LATENTS": [-1, -1, -1, -1], "STEP": [2], "PREVIEW": [-1, -1, 3],
        "ERROR": [1]}
    assert {o.name: list(o.dims) for o in unary.output} == {"IMAGE": [-1, -1, -1, 3],
                                                            "LATENTS": [-1, -1, -1, -1]}
    assert parameters_of(engine)["FORCE_CPU_ONLY_INPUT_TENSORS"] == "yes"
    assert not unary.parameters
    assert unary.instance_group[0].count == 3  # one per request in flight
    assert unary.dynamic_batching.default_queue_policy.max_queue_size == 5


def test_unknown_or_missing_parameter_is_rejected():
    written = PARAMS.to_parameters()
    with pytest.raises(ValueError, match="'stride' is not part of the contract"):
        PipelineParams.from_parameters({**written, "stride": "2"})
    del written["latent_shape"]
    with pytest.raises(ValueError, match="missing: \\['latent_shape'\\]"):
        PipelineParams.from_parameters(written)


def test_gpus_default_to_a_cpu_deployment():
    """A repository exported before ``gpus`` existed (no such parameter) is a CPU deployment."""
    written = PARAMS.to_parameters()
    assert written["gpus"] == "[1, 2, 3]"
    del written["gpus"]
    assert PipelineParams.from_parameters(written).gpus is None
    cpu = dataclasses.replace(PARAMS, gpus=None)
    assert PipelineParams.from_parameters(cpu.to_parameters()) == cpu


def inputs_getter(**arrays):
    return lambda name: arrays.get(name)


def test_request_from_inputs_applies_defaults_and_values():
    defaults = Request(steps=30, scheduler="euler")
    got = Request.from_inputs(inputs_getter(PROMPT=np.array([b"a seven"], object),
                                            SEED=np.array([MAX_SEED], np.int64),
                                            GUIDANCE_SCALE=np.array([0.0], np.float32)), defaults)
    assert got == Request("a seven", seed=MAX_SEED, steps=30, guidance_scale=0.0, scheduler="euler")


@pytest.mark.parametrize("inputs, message", [
    ({"PROMPT": None}, "PROMPT is required"),
    ({"PROMPT": np.array([b"  "], object)}, "PROMPT must be a non-empty"),
    ({"PROMPT": np.array([b"\xff"], object)}, "PROMPT must be valid UTF-8"),
    ({"STEPS": np.array([0], np.int32)}, r"STEPS must be in \[1, 1000\], got 0"),
    ({"STEPS": np.array([4, 5], np.int32)}, "STEPS must hold exactly one element, got shape \\[2\\]"),
    ({"STEPS": np.array([4], np.int32), "WARMUP": np.array([4], np.int32)},
     r"WARMUP must be in \[1, 3\]"),
    ({"SEED": np.array([-1], np.int64)}, "SEED must be in \\[0, "),
    ({"GUIDANCE_SCALE": np.array([np.nan], np.float32)}, "GUIDANCE_SCALE must be a finite number"),
    ({"SCHEDULER": np.array([b"pndm"], object)}, "SCHEDULER must be one of"),
    ({"GUIDANCE_SCALE": np.array([3e38], np.float32)},
     r"GUIDANCE_SCALE must be a finite number in \[0, 100\]"),
    ({"PROMPT": np.array([b"7" * 4097], object)}, "PROMPT is 4097 bytes; the limit is 4096 bytes"),
    ({"NEGATIVE_PROMPT": np.array([b"x" * 5000], object)}, "NEGATIVE_PROMPT is 5000 bytes"),
])
def test_request_errors_name_the_field_and_range(inputs, message):
    arrays = {"PROMPT": np.array([b"a seven"], object), **inputs}  # None: not sent
    with pytest.raises(ValueError, match=message):
        Request.from_inputs(inputs_getter(**arrays), Request())


def test_inputs_cover_the_request_and_encode_as_declared():
    assert {f.field for f in INPUTS} == {f.name for f in dataclasses.fields(Request)}
    request = Request("héllo", "n", 3, 10, 2.5, 2, "dpmsolver++")
    arrays = request.to_inputs()
    for name, array in arrays.items():
        f = INPUT_BY_NAME[name]
        assert array.shape == (1,) and array.dtype == f.numpy_dtype
    assert arrays["PROMPT"][0] == "héllo".encode()
    assert Request.from_inputs(arrays.get, Request()) == request


def test_request_arguments_for_client_and_export():
    client, export = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_request_arguments(client, None)
    add_request_arguments(export, Request())
    assert vars(client.parse_args([])) == {f.field: None for f in INPUTS if not f.required}
    assert vars(export.parse_args(["--guidance-scale", "2"])) == {
        **{f.field: getattr(Request(), f.field) for f in INPUTS if not f.required},
        "guidance_scale": 2.0}


@pytest.mark.parametrize("bad", [dict(prompt=""), dict(seed=-1), dict(steps=0), dict(steps=4, warmup=4),
                                 dict(guidance_scale=1e9), dict(scheduler="pndm"),
                                 dict(prompt="x" * 5000)])
def test_every_request_error_is_classified_invalid_arg(bad):
    """The unary model restores an engine error's status from its message (error_kind)."""
    with pytest.raises(ValueError) as err:
        Request(**{"prompt": "x", **bad}).validate()
    assert error_kind(str(err.value)) == "INVALID_ARG"
    assert error_kind("server busy: 4 requests in flight") == "UNAVAILABLE"
    assert error_kind("cancelled before step 3") == "CANCELLED"
    assert error_kind("model 'unet_part_1' failed: boom") == "INTERNAL"


def test_size_inputs_are_declared_by_sdxl_deployments_only():
    """SDXL's ORIGINAL_SIZE / CROPS_COORDS_TOP_LEFT: optional [2] inputs of both pipeline models
    of an SDXL deployment; an SD deployment declares neither (Triton refuses them)."""
    assert model_inputs(PARAMS, stream=False) == INPUTS
    assert model_inputs(PARAMS, stream=True) == STREAM_INPUTS
    sdxl = dataclasses.replace(PARAMS, device="cpu", conditioning="sdxl",
                               force_zeros_for_empty_prompt=True)
    assert repo_mod.pipeline_params(parse_config(to_pbtxt(repo_mod.pipeline_config(sdxl)))) == sdxl
    sizes = [("ORIGINAL_SIZE", [2], True), ("CROPS_COORDS_TOP_LEFT", [2], True)]
    for config, base in ((repo_mod.pipeline_config(sdxl), STREAM_INPUTS),
                         (repo_mod.unary_config(sdxl), INPUTS)):
        assert [(i.name, list(i.dims), i.optional) for i in config.input] == \
            [(f.name, list(f.dims), not f.required) for f in base] + sizes
    # their errors name the input, so a forwarded one keeps its status
    from asyncdiff.conditioning import parse_size_inputs

    assert [f.name for f in SIZE_INPUTS] == [name for name, _, _ in sizes]
    with pytest.raises(ValueError) as err:
        parse_size_inputs({"CROPS_COORDS_TOP_LEFT": np.array([-1, 0], np.int32)}.get, 32, 32)
    assert error_kind(str(err.value)) == "INVALID_ARG"
