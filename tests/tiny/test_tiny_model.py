"""The committed tiny text-to-image model and its digit classifier."""

import socket

import numpy as np
import pytest
import torch

from asyncdiff.tiny import (DIGIT_WORDS, MODEL_DIR, classify, digit_of,
                            load_pipeline, prompt_templates, prompts_for)
from asyncdiff.tiny.data import load_split



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _refuse(*_args, **_kwargs):
    raise OSError("network access while loading the tiny model")


@pytest.fixture(scope="module")
def pipe():
    # Loading must not reach any hub: sockets are refused meanwhile.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _refuse)
        p = load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def sample(pipe, prompt, seed=0, steps=4, output_type="np"):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=3.0,
                generator=gen, output_type=output_type).images


def test_loads_offline(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.config.sample_size == 16


def test_folder_is_standard_and_small():
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MODEL_DIR / part).is_dir()
    assert (MODEL_DIR / "tokenizer" / "vocab.json").exists()
    assert not (MODEL_DIR / "tokenizer" / "tokenizer.json").exists()
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 15_000_000


def test_seeded_sample_is_deterministic(pipe):
    a = sample(pipe, "a handwritten digit 4", seed=7)
    b = sample(pipe, "a handwritten digit 4", seed=7)
    c = sample(pipe, "a handwritten digit 4", seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_short_sample_shape_and_range(pipe):
    images = sample(pipe, ["digit 1", "the number two"], steps=3)
    assert images.shape == (2, 16, 16, 1)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    pil = sample(pipe, "7", steps=2, output_type="pil")[0]
    assert pil.size == (16, 16) and pil.mode == "L"


def test_tokenizer_round_trips_prompt_vocabulary(pipe):
    tok = pipe.tokenizer
    assert tok("a photo of a cat").input_ids == [
        49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's ids
    words = {w for t in prompt_templates for w in t.split() if "{" not in w}
    words |= set(DIGIT_WORDS) | {str(d) for d in range(10)}
    for text in sorted(words) + [p for d in range(10) for p in prompts_for(d)]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ids[1:-1]  # nothing fell back to unk
        assert tok.decode(ids, skip_special_tokens=True).strip() == text


def test_prompt_helpers():
    assert prompts_for(7)[:2] == ["7", "seven"]
    assert all(digit_of(p) == d for d in range(10) for p in prompts_for(d))
    assert digit_of("a cat") is None


def test_classifier_heldout_accuracy():
    images, labels = load_split("heldout")
    assert len(labels) == 300
    assert (classify(images) == labels.numpy()).mean() >= 0.97


def test_classifier_accepts_all_image_formats():
    from PIL import Image

    images, labels = load_split("heldout")
    x = images[:20]
    want = classify(x)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray((im[..., 0] * 255).round().astype(np.uint8))
           for im in nhwc]
    for variant in (x * 2 - 1, nhwc, nhwc.repeat(3, -1), pil):
        assert np.array_equal(classify(variant), want)
    assert classify(x[0]).tolist() == want[:1].tolist()
