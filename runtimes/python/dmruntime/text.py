"""Prompts to UNet conditions: the tokenizers and text encoders of a text-to-image bundle
(manifest key ``text``), run with the ``tokenizers`` library and ONNX Runtime.

    "text": {"encoders": [{"file": "text_encoder.onnx", "tokenizer": "tokenizer.json",
                           "max_length": 77, "pad_id": 49407, "hidden_size": 768,
                           "outputs": ["hidden"], "clip_skip": null, "precision": "fp32"}],
             "condition": "encoder_hidden_states",
             "pooled": "text_embeds",                   # optional (SDXL)
             "force_zeros_for_empty_prompt": true}      # optional (SDXL)

Each encoder graph takes ``input_ids`` int64 [B, max_length] and gives ``hidden`` [B, L, D]
(``last_hidden`` too when built with clip_skip: the hidden state diffusers encodes negative
prompts with, which ignores clip_skip); the condition is the encoders' ``hidden`` concatenated
along the last axis, in their order. An encoder with ``pooled`` [B, P] among its outputs (SDXL's
second, CLIPTextModelWithProjection) gives the input named by the entry's ``pooled``. The second
tokenizer takes ``prompts_2`` where given (diffusers' ``prompt_2``), else the same prompts. With
``force_zeros_for_empty_prompt`` no negative prompt means zeros, not the empty prompt's encoding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .components import Component
from .engine import OnnxEngine, run_session
from .errors import BundleError, InputError
from .schema import FILE, Bool, Int, List, Obj, Opt, Str

ENCODER = Obj(required={"file": FILE, "tokenizer": FILE, "max_length": Int(1, 4096), "pad_id": Int(0),
                        "outputs": List(Str(("hidden", "last_hidden", "pooled")), min_len=1, max_len=3)},
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
    schema = Obj(required={"encoders": List(ENCODER, min_len=1, max_len=4), "condition": Str()},
                 optional={"pooled": Str(), "force_zeros_for_empty_prompt": Bool()})

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

    def check_second(self, prompts: list[str], prompts_2) -> list[str] | None:
        """The second encoder's prompts, checked: one per prompt, and a bundle with a second encoder."""
        if prompts_2 is None:
            return None
        if len(self.tokenizers) < 2:
            raise InputError("a second prompt (prompt_2, --prompt-2) applies to pipelines with two text encoders "
                             "(SDXL); this bundle has one: leave it out")
        prompts_2 = check_prompts(prompts_2)
        if len(prompts_2) != len(prompts):
            raise InputError(f"{len(prompts_2)} second prompt(s) for {len(prompts)} prompt(s); give one each")
        return prompts_2

    def tokenize(self, prompts, prompts_2=None) -> list[np.ndarray]:
        """Token ids per encoder, int64 [len(prompts), max_length] (the second and later tokenizers
        take ``prompts_2`` where given); warns once per prompt cut short."""
        prompts = check_prompts(prompts)
        prompts_2 = self.check_second(prompts, prompts_2)
        out = []
        for k, tok in enumerate(self.tokenizers):
            texts = prompts if k == 0 or prompts_2 is None else prompts_2
            encodings = tok.encode_batch(texts)
            if k == 0 or (k == 1 and prompts_2 is not None):
                for p, enc in zip(texts, encodings):
                    if enc.overflowing:
                        dropped = tok.decode([i for o in enc.overflowing for i in o.ids])
                        warnings.warn(f"prompt {p[:40]!r}... is longer than the tokenizer's {tok.truncation['max_length']} "
                                      f"tokens; this part was cut (as diffusers does): {dropped!r}", stacklevel=3)
            out.append(np.array([e.ids for e in encodings], dtype=np.int64))
        return out

    def encode(self, prompts, negative: bool = False, batch_size: int = 64, prompts_2=None) -> dict[str, np.ndarray]:
        """``{condition: float32 [len(prompts), L, D]}`` for ``prompts`` (and ``{pooled: [len(prompts),
        P]}`` where an encoder gives one); ``negative``: the encoding diffusers gives negative prompts
        (the hidden state it takes for them even with clip_skip)."""
        ids = self.tokenize(prompts, prompts_2)
        hidden, out = [], {}
        for e, engine, x in zip(self.entry["encoders"], self.engines, ids):
            name = "last_hidden" if negative and "last_hidden" in e["outputs"] else "hidden"
            names = [name] + (["pooled"] if "pooled" in e["outputs"] else [])
            rows = [run_session(engine.session, names, {"input_ids": x[i:i + batch_size]}, engine.path)
                    for i in range(0, len(x), batch_size)]
            rows = rows if len(names) > 1 else [[r] for r in rows]
            hidden.append(np.concatenate([r[0] for r in rows]).astype(np.float32, copy=False))
            if len(names) > 1:  # diffusers keeps the last encoder's pooled output
                out[self.entry["pooled"]] = np.concatenate([r[1] for r in rows]).astype(np.float32, copy=False)
        out[self.condition] = np.concatenate(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        return out

    def encode_negative(self, prompt: str | None = None, prompt_2: str | None = None) -> dict[str, np.ndarray]:
        """One row (no batch axis) per condition for the negative prompt, as diffusers encodes it:
        ``None`` is the empty prompt, or zeros where the pipeline forces them
        (``force_zeros_for_empty_prompt``, SDXL); ``prompt_2`` defaults to ``prompt``."""
        if prompt is None and prompt_2 is not None:
            raise InputError("a second negative prompt needs a negative prompt")
        enc = self.encode([prompt or ""], negative=True,
                          prompts_2=None if prompt_2 is None else [prompt_2])
        rows = {k: v[0] for k, v in enc.items()}
        if prompt is None and self.entry.get("force_zeros_for_empty_prompt"):
            rows = {k: np.zeros_like(v) for k, v in rows.items()}
        return rows


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
