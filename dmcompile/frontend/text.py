"""The text side of a text-to-image pipeline folder: tokenizers and text encoders, read,
checked against the UNet, and exported as bundle components (dmruntime's ``text``).

A pipeline has one (tokenizer, text encoder) pair per entry of :data:`TEXT_SLOTS` that its
folder holds (SD 1.x / 2.x: one; SDXL adds ``tokenizer_2`` / ``text_encoder_2``). The UNet's
``encoder_hidden_states`` is the encoders' hidden states concatenated along the last axis, so
their widths must add up to the UNet's ``cross_attention_dim``.

Tokenizers: a folder's ``tokenizer.json`` is read as it is; a folder with ``vocab.json`` +
``merges.txt`` only (older SD folders, SD 1.5's own) is converted here into the tokenizer
transformers' ``CLIPTokenizer`` builds from them. Either way the bundle gets one
``tokenizer.json`` for the ``tokenizers`` library, padded to the pipeline's max length with its
pad token (SD 1.x: ``<|endoftext|>``; SD 2.x / OpenCLIP: ``!``) and truncated as diffusers does.
"""

from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExportError, ModelError

# (tokenizer folder, text encoder folder) of a pipeline, in the order their hidden states are concatenated
TEXT_SLOTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
CLIP_BPE = Path(__file__).resolve().parent.parent / "zoo" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
# CLIPTokenizer's pre-tokenizer split (transformers' tokenization_clip.py)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class TextPart:
    """One tokenizer and the text encoder it feeds: the tokenizer (a ``tokenizers.Tokenizer``,
    padding and truncation set), where it came from, and the torch encoder in eval mode."""

    slot: str  # the encoder's folder name ("text_encoder")
    tokenizer: object = field(repr=False)
    tokenizer_source: str  # "tokenizer.json" or "vocab.json + merges.txt"
    max_length: int
    pad_id: int
    encoder: object = field(repr=False)
    config: dict = field(repr=False)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def projection(self) -> int | None:
        """Width of the pooled projection (CLIPTextModelWithProjection's text_embeds), or None."""
        return int(self.config.get("projection_dim", 512)) if hasattr(self.encoder, "text_projection") else None

    def tokenizer_json(self) -> str:
        return self.tokenizer.to_str()


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocabulary(bpe: Path = CLIP_BPE, size: int = 49408) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of OpenAI's CLIP tokenizer from its BPE file (shipped with dmcompile, from
    the ``open-clip-torch`` wheel): the 49408 tokens of ``openai/clip-vit-large-patch14``'s
    vocab.json; a smaller ``size`` keeps the first merges (a real CLIP-style vocabulary for tiny
    models)."""
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    n_merges = size - 512 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + \
        [CLIP_SPECIALS["bos_token"], CLIP_SPECIALS["eos_token"]]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, size: int = 49408, pad_token: str = "<|endoftext|>",
                         max_length: int = 77) -> None:
    """A tokenizer folder as older diffusers pipelines ship it: vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json (no tokenizer.json)."""
    vocab, merges = clip_vocabulary(size=size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    specials = {**CLIP_SPECIALS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({**specials, "model_max_length": max_length,
                                                              "tokenizer_class": "CLIPTokenizer"}))


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict):
    """The ``tokenizers.Tokenizer`` that transformers' ``CLIPTokenizer`` builds from vocab and
    merges: NFC, whitespace runs to one space, lower case; CLIP's split, byte-level BPE with
    ``</w>`` word ends; ``<|startoftext|> ... <|endoftext|>`` around every prompt."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    unk = specials.get("unk_token", CLIP_SPECIALS["unk_token"])
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    bos, eos = specials.get("bos_token", CLIP_SPECIALS["bos_token"]), specials.get("eos_token", CLIP_SPECIALS["eos_token"])
    for name in (bos, eos, unk, specials.get("pad_token")):
        if name is not None and name not in vocab:
            raise ModelError(f"special token {name!r} is not in the tokenizer's vocab.json")
    tok.add_special_tokens(sorted({bos, eos, unk} | ({specials["pad_token"]} if specials.get("pad_token") else set())))
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                      add_prefix_space=False)
    return tok


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(folder: Path, what: str):
    """(tokenizers.Tokenizer with the pipeline's padding and truncation, source, max length, pad id)
    from a diffusers tokenizer folder; ModelError when it cannot be read."""
    from tokenizers import Tokenizer

    if not folder.is_dir():
        raise ModelError(f"{what}: the pipeline has no {folder.name}/ folder; a text-to-image pipeline needs its "
                         "tokenizer (tokenizer.json, or vocab.json + merges.txt) next to its text encoder")
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        p = folder / name
        if p.is_file():
            try:
                config.update({k: v for k, v in json.loads(p.read_text()).items() if v is not None})
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelError(f"{what}: {p} is not valid JSON ({e})") from None
    specials = {k: _token_name(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials = {k: v for k, v in specials.items() if v}
    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise ModelError(f"{what}: {folder / 'tokenizer.json'} cannot be read by the tokenizers library ({e})") \
                from None
        source = "tokenizer.json"
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{what}: vocab.json / merges.txt cannot be read ({e})") from None
        merges = [tuple(m.split()) for m in lines if m.strip() and not m.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise ModelError(f"{what}: merges.txt must hold two tokens per line")
        tok = clip_tokenizer(vocab, merges, specials)
        source = "vocab.json + merges.txt"
    else:
        raise ModelError(f"{what}: {folder} has neither tokenizer.json nor vocab.json + merges.txt; copy the "
                         "pipeline's tokenizer folder")
    max_length = config.get("model_max_length", 77)
    if not isinstance(max_length, int) or not 1 <= max_length <= 4096:  # transformers' "no limit" is 1e30
        raise ModelError(f"{what}: tokenizer_config.json model_max_length must be the encoder's length (e.g. 77), "
                         f"got {max_length!r}")
    pad = specials.get("pad_token", specials.get("eos_token", CLIP_SPECIALS["eos_token"]))
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ModelError(f"{what}: pad token {pad!r} is not in the vocabulary")
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
    return tok, source, max_length, pad_id


def load_text_encoder(folder: Path, what: str):
    """(CLIPTextModel in eval mode, its config as JSON) from a pipeline's text encoder folder."""
    import transformers
    from safetensors.torch import load_file

    p = folder / "config.json"
    if not p.is_file():
        raise ModelError(f"{what}: {folder} has no config.json")
    try:
        config = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{what}: {p} is not valid JSON ({e})") from None
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in TEXT_ENCODER_CLASSES:
        raise ModelError(f"{what}: text encoder class {arch!r} is not supported; dmcompile exports "
                         f"{', '.join(TEXT_ENCODER_CLASSES)}")
    weights = next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)
    if weights is None:
        raise ModelError(f"{what}: {folder} has no {WEIGHT_FILES[0]} (dmcompile reads safetensors only; convert "
                         "pickled weights with save_pretrained(..., safe_serialization=True))")
    try:
        cfg = transformers.CLIPTextConfig.from_dict({k: v for k, v in config.items() if k != "architectures"})
        cfg._attn_implementation = "eager"  # traces to plain MatMul/Softmax, the ops the QDQ pass knows
        enc = getattr(transformers, arch)(cfg)
        state = load_file(str(weights))
        if not hasattr(enc, "text_model"):  # transformers 5 dropped the text_model level checkpoints name
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        elif not any(k.startswith("text_model.") for k in state):
            state = {f"text_model.{k}": v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer older ones store
        missing, unexpected = enc.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except Exception as e:
        raise ModelError(f"{what}: cannot load the {arch} ({str(e).splitlines()[0]}); fix its config or "
                         "weights") from e
    enc.eval().requires_grad_(False)
    return enc, config


def load_text_parts(root: Path, unet_config: dict, pooled: str | None = None,
                    pooled_width: int | None = None) -> tuple[TextPart, ...]:
    """The (tokenizer, text encoder) pairs of a pipeline folder (:data:`TEXT_SLOTS` it has),
    checked against each other and the UNet (``pooled``: the UNet input the last projecting
    encoder's pooled output feeds, ``pooled_width`` wide); () for a pipeline without a text encoder."""
    parts = []
    for tok_slot, enc_slot in TEXT_SLOTS:
        if not (root / enc_slot).is_dir():
            continue
        what = f"pipeline folder {root}"
        tok, source, max_length, pad_id = read_tokenizer(root / tok_slot, what)
        enc, config = load_text_encoder(root / enc_slot, what)
        parts.append(TextPart(enc_slot, tok, source, max_length, pad_id, enc, config))
    check_text_parts(parts, unet_config, root, pooled, pooled_width)
    return tuple(parts)


def pooled_part(parts) -> int | None:
    """Index of the encoder whose pooled projection the UNet takes: the last one with a projection,
    as diffusers' SDXL pipelines keep it."""
    return next((i for i in reversed(range(len(parts))) if parts[i].projection is not None), None)


def check_text_parts(parts, unet_config: dict, root: Path, pooled: str | None = None,
                     pooled_width: int | None = None) -> None:
    """ModelError when the pipeline's text side and its UNet cannot work together."""
    if not parts:
        if pooled:
            raise ModelError(f"pipeline folder {root}: its UNet takes {pooled} (a text encoder's pooled projection), "
                             "and the folder has no text_encoder/ or text_encoder_2/")
        return
    if pooled:
        i = pooled_part(parts)
        if i is None:
            raise ModelError(f"pipeline folder {root}: its UNet takes {pooled}, a text encoder's pooled projection, and "
                             f"no encoder has one ({', '.join(p.slot for p in parts)} are CLIPTextModel); SDXL's second "
                             "encoder is a CLIPTextModelWithProjection")
        if parts[i].projection != pooled_width:
            raise ModelError(f"the pipeline's parts disagree: {parts[i].slot}'s pooled projection is "
                             f"{parts[i].projection} wide, the UNet's {pooled} is {pooled_width} "
                             "(projection_class_embeddings_input_dim - 6 x addition_time_embed_dim); use encoders and "
                             "a UNet trained together")
    width = sum(p.hidden_size for p in parts)
    cross = unet_config.get("cross_attention_dim")
    if cross is None:
        raise ModelError(f"pipeline folder {root}: it has a text encoder but its UNet takes no encoder_hidden_states "
                         "(no cross_attention_dim); use the UNet of a text-to-image pipeline")
    if isinstance(cross, (list, tuple)):
        cross = cross[0] if len(set(cross)) == 1 else cross
    if width != cross:
        names = " + ".join(f"{p.slot} {p.hidden_size}" for p in parts)
        raise ModelError(f"the pipeline's parts disagree: the text encoder width ({names}) is not the UNet's "
                         f"cross_attention_dim {cross}; use a text encoder and UNet trained together")
    for p in parts:
        vocab = p.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > int(p.config.get("vocab_size", vocab)):
            raise ModelError(f"the pipeline's parts disagree: its tokenizer has {vocab} tokens, {p.slot} embeds "
                             f"{p.config['vocab_size']}; use the tokenizer the encoder was trained with")
        if p.max_length > int(p.config.get("max_position_embeddings", p.max_length)):
            raise ModelError(f"the pipeline's parts disagree: the tokenizer pads to {p.max_length} tokens, {p.slot} "
                             f"has {p.config['max_position_embeddings']} positions")


def text_digest_parts(parts) -> list:
    """(name, str or bytes) pairs of the text side for the export's cache key: configs,
    tokenizers, weights."""
    out = []
    for p in parts:
        out.append((p.slot, json.dumps([p.config, p.tokenizer_json(), p.max_length, p.pad_id], sort_keys=True,
                                       default=str)))
        out += [(n, t.detach().contiguous().numpy().tobytes()) for n, t in sorted(p.encoder.state_dict().items())]
    return out


def export_text(parts, folder: Path, opset: int, clip_skip: int | None, parity_tol: float, layer: str = "last",
                pooled: str | None = None, force_zeros: bool = False) -> tuple[dict, list[str]]:
    """Each text encoder to ONNX (``input_ids`` int64 [B, L] -> ``hidden`` [B, L, D]) and each
    tokenizer to tokenizer.json, as diffusers' pipelines take them; returns the manifest's ``text``
    entry and the files. ``layer="last"`` (SD 1.x / 2.x): the last hidden state, or with
    ``clip_skip`` the hidden state that many layers before it through the final layer norm, and
    then also ``last_hidden`` for negative prompts. ``layer="penultimate"`` (SDXL): the hidden
    state 2 + clip_skip from the end, no final norm (negatives: 2 from the end, ``last_hidden``).
    ``pooled``: the UNet input the last projecting encoder's pooled projection feeds (output
    ``pooled``). ``force_zeros``: the pipeline's ``force_zeros_for_empty_prompt``."""
    import onnxruntime as ort
    import torch

    entries, files = [], []
    with_pooled = pooled_part(parts) if pooled else None
    for i, p in enumerate(parts):
        layers = int(p.config["num_hidden_layers"])
        if clip_skip is not None and not 1 <= clip_skip < layers:
            raise ExportError(f"clip_skip {clip_skip} must be in [1, {layers - 1}] for {p.slot} ({layers} layers)")
        suffix = "" if i == 0 else f"_{i + 1}"
        onnx_name, tok_name = f"text_encoder{suffix}.onnx", f"tokenizer{suffix}.json"
        gives_pooled = i == with_pooled
        outputs = ["hidden"] + (["last_hidden"] if clip_skip else []) + (["pooled"] if gives_pooled else [])

        class Encoder(torch.nn.Module):
            def __init__(self, enc):
                super().__init__()
                self.enc = enc

            def forward(self, input_ids):
                out = self.enc(input_ids, output_hidden_states=clip_skip is not None or layer == "penultimate")
                extra = (out.text_embeds,) if gives_pooled else ()
                if layer == "penultimate":
                    hs = out.hidden_states
                    return (hs[-(2 + (clip_skip or 0))], *((hs[-2],) if clip_skip else ()), *extra)
                if clip_skip is None:
                    return (out.last_hidden_state, *extra) if extra else out.last_hidden_state
                norm = getattr(self.enc, "text_model", self.enc).final_layer_norm
                skipped = norm(out.hidden_states[-(clip_skip + 1)])
                return (skipped, out.last_hidden_state, *extra)

        prompts = ["a photograph of an astronaut riding a horse", "", "the number 7, written thin"]
        ids = np.array([e.ids for e in p.tokenizer.encode_batch(prompts)], np.int64)
        module = Encoder(p.encoder).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (torch.from_numpy(ids[:2]),), str(folder / onnx_name),
                                  input_names=["input_ids"], output_names=outputs,
                                  dynamic_axes={"input_ids": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            except Exception as e:
                raise ExportError(f"tracing {p.slot} to ONNX failed: {e}") from e
            want = module(torch.from_numpy(ids))
            want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
        got = ort.InferenceSession(str(folder / onnx_name), providers=["CPUExecutionProvider"]).run(
            outputs, {"input_ids": ids})
        err = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
        if not err <= parity_tol:
            raise ExportError(f"ONNX export of {p.slot} differs from PyTorch by {err:.3g} (> parity_tol {parity_tol})")
        (folder / tok_name).write_text(p.tokenizer_json())
        entries.append({"file": onnx_name, "tokenizer": tok_name, "max_length": p.max_length, "pad_id": p.pad_id,
                        "hidden_size": p.hidden_size, "outputs": outputs, "clip_skip": clip_skip, "layer": layer,
                        "class": (p.config.get("architectures") or ["CLIPTextModel"])[0], "slot": p.slot,
                        "tokenizer_source": p.tokenizer_source, "parity_max_abs_err": err, "precision": "fp32"})
        files += [onnx_name, tok_name]
    entry = {"encoders": entries, "condition": "encoder_hidden_states"}
    if pooled:
        entry.update(pooled=pooled, force_zeros_for_empty_prompt=force_zeros)
    return entry, files
