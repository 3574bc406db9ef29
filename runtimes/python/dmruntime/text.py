"""Prompts to UNet conditions: the tokenizers and text encoders of a text-to-image bundle
(manifest key ``text``), run with the ``tokenizers`` library and ONNX Runtime.

    "text": {"encoders": [{"file": "text_encoder.onnx", "tokenizer": "tokenizer.json",
                           "max_length": 77, "pad_id": 49407, "hidden_size": 768,
                           "outputs": ["hidden"], "clip_skip": null, "precision": "fp32"}],
             "condition": "encoder_hidden_states"}

Each encoder graph takes ``input_ids`` int64 [B, max_length] and gives ``hidden`` [B, L, D]
(``last_hidden`` too when built with clip_skip: diffusers encodes negative prompts without it);
the condition is the encoders' ``hidden`` concatenated along the last axis, in their order.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .components import Component
from .engine import OnnxEngine, run_session
from .errors import BundleError, InputError
from .schema import FILE, Int, List, Obj, Opt, Str

ENCODER = Obj(required={"file": FILE, "tokenizer": FILE, "max_length": Int(1, 4096), "pad_id": Int(0),
                        "outputs": List(Str(("hidden", "last_hidden")), min_len=1, max_len=2)},
              optional={"hidden_size": Int(1), "clip_skip": Opt(Int(1)), "precision": Str()})


def check_prompts(prompts) -> list[str]:
    """A list of prompts (one string is one prompt); InputError for anything else, or text
    that is not valid UTF-8 (a command line's undecodable bytes)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts given: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} must be a string, got {type(p).__name__}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"prompt {i} is not valid UTF-8 text ({p.encode('utf-8', 'replace')[:60]!r}); "
                             "pass UTF-8 text") from None
    return prompts


class TextEncoders(Component):
    """Tokenizers and text encoders of a text-to-image bundle: ``encode(prompts)`` gives the
    UNet's conditions, with the pipeline's padding, truncation (a prompt past the tokenizer's
    limit is cut there, with a warning, as diffusers does) and encoder outputs."""

    key = "text"
    schema = Obj(required={"encoders": List(ENCODER, min_len=1, max_len=4), "condition": Str()})

    def __init__(self, root: Path, entry: dict, input_shape: tuple[int, ...], threads: int = 0):
        from tokenizers import Tokenizer

        self.entry = entry
        self.condition = entry["condition"]
        self.tokenizers, self.engines = [], []
        for e in entry["encoders"]:
            try:
                tok = Tokenizer.from_file(str(Path(root) / e["tokenizer"]))
            except Exception as err:
                raise BundleError(f"cannot read tokenizer {e['tokenizer']}: {err}; rebuild the bundle") from None
            pad = tok.id_to_token(e["pad_id"])
            if pad is None:
                raise BundleError(f"manifest text pad_id {e['pad_id']} is not in {e['tokenizer']}; rebuild the bundle")
            tok.enable_truncation(e["max_length"])
            tok.enable_padding(length=e["max_length"], pad_id=e["pad_id"], pad_token=pad)
            self.tokenizers.append(tok)
            self.engines.append(OnnxEngine(Path(root) / e["file"], (e["max_length"],), threads=threads))
        self.engine = self.engines[0]

    @classmethod
    def files(cls, entry: dict) -> list[str]:
        return [f for e in entry["encoders"] for f in (e["file"], e["tokenizer"])]

    @classmethod
    def input_shape(cls, manifest: dict) -> tuple[int, ...]:
        return (int(manifest["text"]["encoders"][0]["max_length"]),)

    @property
    def max_length(self) -> int:
        return int(self.entry["encoders"][0]["max_length"])

    def tokenize(self, prompts) -> list[np.ndarray]:
        """Token ids per encoder, int64 [len(prompts), max_length]; warns once per prompt cut short."""
        prompts = check_prompts(prompts)
        out = []
        for k, tok in enumerate(self.tokenizers):
            encodings = tok.encode_batch(prompts)
            if k == 0:
                for p, enc in zip(prompts, encodings):
                    if enc.overflowing:
                        dropped = tok.decode([i for o in enc.overflowing for i in o.ids])
                        warnings.warn(f"prompt {p[:40]!r}... is longer than the tokenizer's {tok.truncation['max_length']} "
                                      f"tokens; this part was cut (as diffusers does): {dropped!r}", stacklevel=3)
            out.append(np.array([e.ids for e in encodings], dtype=np.int64))
        return out

    def encode(self, prompts, negative: bool = False, batch_size: int = 64) -> dict[str, np.ndarray]:
        """``{condition: float32 [len(prompts), L, D]}`` for ``prompts``; ``negative``: the
        encoding diffusers gives negative prompts (the last hidden state even with clip_skip)."""
        ids = self.tokenize(prompts)
        hidden = []
        for e, engine, x in zip(self.entry["encoders"], self.engines, ids):
            name = "last_hidden" if negative and "last_hidden" in e["outputs"] else "hidden"
            rows = [run_session(engine.session, [name], {"input_ids": x[i:i + batch_size]}, engine.path)
                    for i in range(0, len(x), batch_size)]
            hidden.append(np.concatenate(rows).astype(np.float32, copy=False))
        return {self.condition: np.concatenate(hidden, axis=-1) if len(hidden) > 1 else hidden[0]}


def read_prompts(path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines skipped); InputError for a
    missing or empty file or one that is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist; pass a text file with one prompt per line")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not valid UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8") \
            from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts
