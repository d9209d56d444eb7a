"""Build a real CLIP BPE tokenizer folder from OpenAI's merges file.

The released CLIP vocabulary ships as ``bpe_simple_vocab_16e6.txt.gz`` (for
example inside the open_clip_torch wheel). We turn it once into the
``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` trio that
``CLIPTokenizer.from_pretrained`` reads, which gives token ids identical to
OpenAI CLIP. The converted files are committed with the model, so this is
only needed to regenerate them.
"""

import gzip
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP keeps 49152 - 256 - 2 merges after the version header line.
N_MERGES = 49152 - 256 - 2


def byte_alphabet():
    """Printable stand-in char for each byte, in CLIP's vocabulary order:
    printable bytes map to themselves and come first, the other bytes map
    to chars past 255 and follow."""
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    return ([chr(b) for b in printable]
            + [chr(256 + i) for i in range(len(others))])


def read_merges(gz_path):
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:N_MERGES + 1]]


def build_vocab(merges):
    base = byte_alphabet()
    tokens = base + [c + "</w>" for c in base]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_dir(gz_path, out_dir):
    """Write the three files ``CLIPTokenizer.from_pretrained`` needs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = read_merges(gz_path)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                   encoding="utf-8")
    body = "\n".join(" ".join(pair) for pair in merges)
    (out / "merges.txt").write_text("#version: 0.2\n" + body + "\n",
                                    encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,  # SD-1.x convention
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
