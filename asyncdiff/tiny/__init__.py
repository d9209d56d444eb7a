"""A tiny trained text-to-image Stable Diffusion pipeline (16x16 digits).

It ships inside the package as the project's default offline model and as
the fidelity yardstick for AsyncDiff: a real ``StableDiffusionPipeline``
(AutoencoderKL, CLIP tokenizer + text encoder, cross-attention UNet, DDIM)
trained on sklearn's digits. ``classify`` is the matching digit judge.
See docs/tiny-model.md.
"""

from pathlib import Path

from .classifier import CLASSIFIER_DIR, classify, load_classifier
from .data import DIGIT_WORDS, digit_of, prompt_templates, prompts_for

MODEL_DIR = Path(__file__).resolve().parent / "model"


def load_pipeline(device="cpu", path=MODEL_DIR):
    """The committed pipeline, loaded from disk only (no hub access)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    return pipe.to(device)


__all__ = ["MODEL_DIR", "CLASSIFIER_DIR", "load_pipeline", "DIGIT_WORDS",
           "prompt_templates", "prompts_for", "digit_of", "load_classifier",
           "classify"]
