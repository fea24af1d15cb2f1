"""A1111 "infotext": the generation parameters in a PNG's "parameters" text chunk, as
AUTOMATIC1111's stable-diffusion-webui writes and reads them (modules/infotext_utils.py), so the
webui ("PNG Info"), ComfyUI/Civitai readers and sd-parsers understand sample.py's images:

    a red circle on a blue background <lora:demo_style_lora:0.8>
    Negative prompt: blurry
    Steps: 4, Sampler: LCM, CFG scale: 1.5, Seed: 0, Size: 64x64, Model hash: 0123456789, Model: demo_teacher, ...

The last line holds `Key: value` pairs (the reader takes it as the parameters when it has >= 3 of them);
a value holding `,` `:` a newline or a leading quote is JSON-quoted (json.dumps). LoRAs are
`<lora:name:weight>` tags appended to the prompt, with `Lora hashes: "name: hash, ..."`. Hashes are
A1111's: "Model hash" / "VAE hash" = sha256 of the whole file, first 10 hex ("AutoV2"); a LoRA's =
A1111's network hash, sha256 of a .safetensors file's tensor data (after the JSON header, as
kohya-ss / additional-networks hash it; the whole file for other formats), first 12 hex.
Plain Python (no torch): sample.py and the tests import it.
"""
import hashlib
import json
import os
import re

KEY = re.compile(r"\w[\w \-/]+")                                   # A1111's key pattern
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')   # modules/infotext_utils.py re_param
LORA_TAG = re.compile(r" ?<lora:([^:<>]+):([^<>]*)>")
NEGATIVE = "Negative prompt:"
_HASHES: dict[tuple, str] = {}                                     # (kind, realpath, size, mtime_ns) -> sha256

#----------------------------------------------------------------------------
# Values.

def number(x) -> str:
    """A number as text that reads back exactly: 1.0 -> '1', 0.8 -> '0.8', 7 -> '7'."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def quote(text: str) -> str:
    """A1111's quote(): JSON-quote a value holding ',' ':' or a newline (here also a leading quote or
    surrounding whitespace, so every value reads back as written)."""
    if any(c in text for c in ",:\n\r") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Inverse of quote: a "..." value is JSON-decoded, anything else is returned stripped."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _value(v) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False)
    return number(v)

#----------------------------------------------------------------------------
# Writing and reading.

def format_infotext(params: dict) -> str:
    """{'prompt', 'negative_prompt', 'loras': [(name, weight, hash)], Key: value, ...} -> A1111 infotext."""
    prompt = str(params.get("prompt") or "")
    loras = list(params.get("loras") or [])
    for name, *_ in loras:
        if not name or any(c in str(name) for c in ":<>"):
            raise ValueError(f"LoRA name {name!r} cannot go in a <lora:name:weight> tag (no ':' '<' '>')")
    tags = " ".join(f"<lora:{name}:{number(float(w))}>" for name, w, *_ in loras)
    if tags:
        prompt = f"{prompt} {tags}" if prompt else tags
    fields = []
    for k, v in params.items():
        if k in ("prompt", "negative_prompt"):
            continue
        if k == "loras":
            hashes = [(str(n).replace(",", ""), h) for n, _, *h in loras if h and h[0]]
            if hashes:
                fields.append(("Lora hashes", ", ".join(f"{n}: {h[0]}" for n, h in hashes)))
            continue
        if v is None:
            continue
        if not KEY.fullmatch(k):
            raise ValueError(f"infotext key {k!r} must be word characters, spaces, '-' or '/' (2+ characters)")
        fields.append((k, _value(v)))
    lines = [prompt]
    if params.get("negative_prompt") is not None:
        lines.append(f"{NEGATIVE} {params['negative_prompt']}")
    if fields:
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """A1111 infotext -> {'prompt' (LoRA tags removed), 'negative_prompt' (None if absent),
    'loras': [(name, weight, hash or None)], Key: value (strings), ...}."""
    lines = text.split("\n")
    fields: dict[str, str] = {}
    if len(lines) > 1 and len(PARAM.findall(lines[-1])) >= 3:     # A1111's rule: >= 3 pairs
        for m in PARAM.finditer(lines.pop()):
            fields[m.group(1).strip()] = unquote(m.group(2))
    neg_at = next((i for i, ln in enumerate(lines) if ln.startswith(NEGATIVE)), None)
    prompt = "\n".join(lines if neg_at is None else lines[:neg_at])
    negative = None
    if neg_at is not None:
        negative = "\n".join(lines[neg_at:])[len(NEGATIVE):]
        negative = negative[1:] if negative.startswith(" ") else negative
    hashes = {}
    for item in fields.pop("Lora hashes", "").split(","):
        name, sep, h = item.rpartition(":")
        if sep and name.strip():
            hashes[name.strip()] = h.strip()
    loras = []
    for name, weight in LORA_TAG.findall(prompt):
        w = weight.split(":")[0]                                      # <lora:name:te:unet>: the first weight
        try:
            w = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"LoRA tag <lora:{name}:{weight}> has no numeric weight") from None
        loras.append((name, w, hashes.get(name.replace(",", ""))))
    prompt = LORA_TAG.sub("", prompt)
    return {"prompt": prompt, "negative_prompt": negative, "loras": loras, **fields}

#----------------------------------------------------------------------------
# Hashes (A1111 modules/hashes.py), cached per process by (path, size, mtime): a big checkpoint is
# read once per run however many images name it.

def _sha256(path: str, kind: str) -> str:
    st = os.stat(path)
    key = (kind, os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if kind == "addnet":                                     # skip u64 header length + JSON header
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def short_hash(path: str) -> str:
    """A1111's "Model hash" / "VAE hash" (AutoV2): sha256 of the whole file, first 10 hex."""
    return _sha256(os.fspath(path), "file")[:10]


def lora_hash(path: str) -> str:
    """A1111's "Lora hashes" entry: sha256 of a .safetensors file's tensor data (the additional-networks
    hash, the header skipped), else of the whole file; first 12 hex."""
    path = os.fspath(path)
    return _sha256(path, "addnet" if path.lower().endswith(".safetensors") else "file")[:12]


def stem(path: str) -> str:
    """A file's name without folder and extension: what A1111 calls a model or LoRA."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]
