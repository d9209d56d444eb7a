"""SDXL / SD conditioning equals diffusers' own ``encode_prompt`` + ``_get_add_time_ids``."""

import numpy as np
import pytest
import torch

from asyncdiff.conditioning import (
    SD, SDXL, SizeConditioning, check_added_embedding, cfg_token_ids_each, conditioning_kind,
    denoiser_conditioning, encode_request, token_ids,
)
from asyncdiff.contract import Request
from asyncdiff.partition import partition_unet
from tests.tiny_sdxl import POOLED_DIM, build_tiny_sdxl


@pytest.fixture(scope="module")
def xl():
    return build_tiny_sdxl()


def ours(xl, req, sizes=None, force_zeros=None):
    force = xl.config.force_zeros_for_empty_prompt if force_zeros is None else force_zeros
    return encode_request(SDXL, [xl.text_encoder, xl.text_encoder_2],
                          [xl.tokenizer, xl.tokenizer_2], req,
                          sizes=sizes or SizeConditioning.default(32, 32),
                          force_zeros_for_empty_prompt=force)


def reference(xl, prompt, negative):
    with torch.no_grad():
        pe, npe, pooled, npooled = xl.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True,
                                                     negative_prompt=negative)
    return torch.cat([npe, pe]), torch.cat([npooled, pooled])


@pytest.mark.parametrize("negative, diffusers_negative", [
    ("", None),  # force_zeros_for_empty_prompt: zero negative embeddings
    ("blurry, low quality", "blurry, low quality"),
])
def test_sdxl_embeddings_equal_encode_prompt(xl, negative, diffusers_negative):
    cond = ours(xl, Request("a red cube on a table", negative))
    text, pooled = reference(xl, "a red cube on a table", diffusers_negative)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64) == text.shape
    assert cond["text_embeds"].shape == (2, POOLED_DIM) == pooled.shape
    # diffusers encodes the two rows as two batches of 1, we as one batch of 2: CPU kernels may
    # then sum in another order (measured: text states equal, pooled within 5e-7).
    assert (cond["encoder_hidden_states"] - text).abs().max().item() <= 1e-6
    assert (cond["text_embeds"] - pooled).abs().max().item() <= 1e-6
    zeroed = diffusers_negative is None
    assert (cond["encoder_hidden_states"][0].abs().max().item() == 0.0) == zeroed
    assert (cond["text_embeds"][0].abs().max().item() == 0.0) == zeroed
    assert cond["encoder_hidden_states"][1].abs().max().item() > 0.1


def test_without_force_zeros_an_empty_negative_is_encoded(xl):
    cond = ours(xl, Request("a red cube", ""), force_zeros=False)
    xl.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        text, pooled = reference(xl, "a red cube", None)
    finally:
        xl.register_to_config(force_zeros_for_empty_prompt=True)
    assert cond["encoder_hidden_states"][0].abs().max().item() > 0.1
    assert (cond["encoder_hidden_states"] - text).abs().max().item() <= 1e-6
    assert (cond["text_embeds"] - pooled).abs().max().item() <= 1e-6


@pytest.mark.parametrize("sizes", [
    SizeConditioning.default(32, 32),
    SizeConditioning((1024, 768), (32, 32), (16, 8)),
])
def test_time_ids_equal_get_add_time_ids(xl, sizes):
    cond = ours(xl, Request("a cube"), sizes=sizes)
    ref = xl._get_add_time_ids(sizes.original_size, sizes.crops_coords_top_left, sizes.target_size,
                               dtype=torch.float32, text_encoder_projection_dim=POOLED_DIM)
    assert ref.shape == (1, 6)
    assert torch.equal(cond["time_ids"], torch.cat([ref, ref]))
    check_added_embedding(xl.unet.config, POOLED_DIM)
    with pytest.raises(ValueError, match="added embedding takes 80 features"):
        check_added_embedding(xl.unet.config, POOLED_DIM + 1)


def test_size_conditioning_is_validated():
    with pytest.raises(ValueError, match=r"ORIGINAL_SIZE must be two integers in \[1, 16384\]"):
        SizeConditioning((0, 32), (32, 32)).validate()
    with pytest.raises(ValueError, match="CROPS_COORDS_TOP_LEFT"):
        SizeConditioning((32, 32), (32, 32), (-1, 0)).validate()


def test_two_tokenizers_pad_with_their_own_token(xl):
    first, second = cfg_token_ids_each([xl.tokenizer, xl.tokenizer_2], Request("a cube", "dark"))
    ref1 = xl.tokenizer(["dark", "a cube"], padding="max_length", max_length=77).input_ids
    ref2 = xl.tokenizer_2(["dark", "a cube"], padding="max_length", max_length=77).input_ids
    assert np.array_equal(first, ref1) and np.array_equal(second, ref2)
    assert first[1, -1] == 49407 and second[1, -1] == 0  # end token vs "!"


def test_a_prompt_over_the_limit_is_rejected_by_either_tokenizer(xl):
    long = " ".join(["cube"] * 80)
    for tok in (xl.tokenizer, xl.tokenizer_2):
        with pytest.raises(ValueError, match="PROMPT is 82 tokens including start/end; the limit is 77"):
            token_ids(tok, long)


def test_denoiser_conditioning_is_read_from_the_partition(small_unets):
    xl = partition_unet(small_unets["sdxl"], 2, model="sdxl")
    got = {t.name: (t.role, t.shape) for t in denoiser_conditioning(xl)}
    assert got == {"text_embeds": ("text_embeds", (2, 32)), "time_ids": ("time_ids", (2, 6)),
                   "encoder_hidden_states": ("text", (2, 77, 64))}
    assert conditioning_kind(xl) == SDXL
    sd = partition_unet(small_unets["sd15"], 3, model="sd15")
    assert [t.name for t in denoiser_conditioning(sd)] == ["encoder_hidden_states"]
    assert conditioning_kind(sd) == SD


def test_size_inputs_parse_with_diffusers_defaults():
    from asyncdiff.conditioning import parse_size_inputs

    arrays = {"ORIGINAL_SIZE": np.array([1024, 768], dtype=np.int32)}
    sizes = parse_size_inputs(arrays.get, 32, 48)
    assert sizes == SizeConditioning((1024, 768), (32, 48), (0, 0))
    assert sizes.time_ids().tolist() == [[1024.0, 768.0, 0.0, 0.0, 32.0, 48.0]]
    assert parse_size_inputs({}.get, 32, 48) == SizeConditioning.default(32, 48)
    with pytest.raises(ValueError, match="CROPS_COORDS_TOP_LEFT must hold exactly 2 integers"):
        parse_size_inputs({"CROPS_COORDS_TOP_LEFT": np.array([1], dtype=np.int32)}.get, 32, 32)
    with pytest.raises(ValueError, match="ORIGINAL_SIZE must be two integers"):
        parse_size_inputs({"ORIGINAL_SIZE": np.array([0, 5], dtype=np.int32)}.get, 32, 32)
