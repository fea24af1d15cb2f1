"""Fuzzing the loaders: a few hundred seeded mutations of the bundled teacher checkpoint, the bundled
LCM-LoRA and a .ckpt (pickle) through Pipeline.from_checkpoint / Pipeline.load_lora / lora_io.load_lora.

Every case must load, or raise the project's error: a ValueError (or FileNotFoundError) of one line
that names the file. Anything else is bad: another exception type, a message without the path or
over several lines, a case running past TIMEOUT_S (a hang), an allocation past MEMORY_CAP (the worker
runs under RLIMIT_AS, so a blow-up fails there instead of taking the machine), or a dead interpreter.
Cases run in a worker process, so a crash or hang is counted and the worker restarted.
"""
import json
import os
import random
import resource
import struct
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "demo_teacher.safetensors")
LORA = os.path.join(ROOT, "assets", "demo_lcm_lora.safetensors")
SEED = 20
N_CASES = {"teacher": 150, "lora": 120, "ckpt": 70}
TIMEOUT_S = 30.0                      # a case loads in ~0.1 s; 30 s is a hang even on a busy machine
MEMORY_CAP = 2 * 2**30                # address space a case may add on top of the loaded worker
pytestmark = pytest.mark.slow

#----------------------------------------------------------------------------
# The worker: loads one file per request and reports how it went.

def _status_kb(field: str) -> int:
    """A /proc/self/status figure in KiB (VmSize: address space; VmHWM: peak RSS of this process)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _clear_adapters(pipe) -> None:
    from models import lora as lora_lib
    for m in (pipe.unet, pipe.text):
        for n in lora_lib.lora_names(m):
            lora_lib.remove_lora(m, n)


def _worker(conn) -> None:
    torch.set_num_threads(1)
    from lcm.pipeline import Pipeline
    from models import lora_io
    base = Pipeline.from_checkpoint(TEACHER)                    # the model LoRA cases load onto
    Pipeline.from_checkpoint(TEACHER)                           # warm: allocator, imports
    cap = _status_kb("VmSize") * 1024 + MEMORY_CAP
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn.send(("ready", _status_kb("VmHWM")))
    while (job := conn.recv()) is not None:
        kind, path = job
        try:
            if kind == "lora":                                  # both entry points, each must agree
                try:
                    base.load_lora(path)
                finally:
                    _clear_adapters(base)
                try:
                    lora_io.load_lora(base.unet, path, name="direct")
                finally:
                    _clear_adapters(base)
            else:
                Pipeline.from_checkpoint(path)
            out = ("loaded", "", "")
        except BaseException as e:                             # classified by the parent
            clean = isinstance(e, (ValueError, FileNotFoundError)) and not isinstance(e, MemoryError)
            out = ("clean" if clean else "raised", type(e).__qualname__, str(e))
        conn.send((*out, _status_kb("VmHWM")))


class Worker:
    def __init__(self):
        import multiprocessing as mp
        self.ctx = mp.get_context("spawn")
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        assert self.conn.poll(300), "fuzz worker did not start"
        _, self.base_rss_kb = self.conn.recv()

    def run(self, kind: str, path: str) -> tuple[str, str, str, int]:
        """(outcome, exception type, message, peak RSS KiB); a hang or crash restarts the worker."""
        self.conn.send((kind, path))
        if self.conn.poll(TIMEOUT_S):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.proc.join(1)
        why = "hang" if self.proc.exitcode is None else f"interpreter died (exit code {self.proc.exitcode})"
        self.proc.kill()
        self.proc.join()
        self.start()
        return "raised", why, "", 0

    def close(self):
        self.conn.send(None)
        self.proc.join(10)
        self.proc.kill()

#----------------------------------------------------------------------------
# Mutations. A safetensors file is u64 header length + JSON header + raw data.

DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "ZZ", 7]
JUNK = [None, "x", "", -1, 0, 1, 7, 2**31, 10**6, 10**18, 1.5, float("nan"), True, [], {}, [1, 2, 3], {"zz": 1}]


def split_st(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_st(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _tensor(h, rng):
    return rng.choice(sorted(k for k in h if k != "__metadata__"))


def _junk_json(rng, text: str) -> str:
    """Broken JSON, or valid JSON of the wrong kind."""
    return rng.choice([text[: rng.randrange(len(text))], text.replace('"', "'", 1), text + "}", "{zz}",
                       "", "null", "[]", "42", '"a string"', text.replace(":", "", 1), "\x00\xff"])


def _edit_json_object(rng, obj: dict) -> dict:
    """A wrong type, an unknown field, a dropped field, or a junk value one level down."""
    obj = json.loads(json.dumps(obj))
    op = rng.randrange(4)
    if op == 0 or not obj:
        obj["zz"] = rng.choice(JUNK)
    elif op == 1:
        del obj[rng.choice(sorted(obj))]
    elif op == 2:
        obj[rng.choice(sorted(obj))] = rng.choice(JUNK)
    else:
        subs = [k for k, v in obj.items() if isinstance(v, dict)]
        if not subs:
            obj[rng.choice(sorted(obj))] = rng.choice(JUNK)
        else:
            sub = obj[rng.choice(subs)]
            key = rng.choice(sorted(sub) + ["zz"])
            if key in sub and isinstance(sub[key], list) and sub[key] and rng.random() < 0.5:
                sub[key][rng.randrange(len(sub[key]))] = rng.choice([10**6, -1, 0, "x", None])
            elif key in sub and isinstance(sub[key], list) and rng.random() < 0.5:
                for t in sub[key]:                                # text towers: one tower's field
                    if isinstance(t, dict):
                        t[rng.choice(sorted(t) + ["zz"])] = rng.choice(JUNK)
            else:
                sub[key] = rng.choice(JUNK)
    return obj


def mutate_metadata(rng, h: dict, kind: str) -> str:
    meta = h.setdefault("__metadata__", {})
    keys = ["lcm.config", "lcm.spec"] if kind == "teacher" else ["lcm.spec", "lora_adapter_metadata"]
    key = rng.choice(keys + ["prediction_type", "__whole__", "__value_type__"])
    if key == "__whole__":
        del h["__metadata__"]
        return "metadata removed"
    if key == "__value_type__":                                  # safetensors metadata values are strings
        meta[rng.choice(sorted(meta) or ["a"])] = rng.choice([1, None, ["x"], {"a": 1}])
        return "non-string metadata value"
    if key == "prediction_type":
        meta[key] = rng.choice(["zz", "", "epsilon ", "v_prediction"])
        return f"prediction_type={meta[key]!r}"
    spec = {"num_ddim_timesteps": 50, "sigma_data": 0.5, "timestep_scaling": 10.0}
    peft = {"unet.r": 16, "unet.lora_alpha": 16, "unet.alpha_pattern": {"down_blocks": 8}}
    if key not in meta:
        meta[key] = json.dumps(spec if key == "lcm.spec" else peft if key == "lora_adapter_metadata" else {})
        if key == "lora_adapter_metadata":                       # peft metadata is read only without alphas
            for k in [k for k in h if k.endswith(".alpha")]:
                del h[k]
    op = rng.randrange(4)
    if op == 0:                                                  # e.g. the architecture metadata is gone
        del meta[key]
        return f"{key} removed"
    if op == 1:
        meta[key] = _junk_json(rng, meta[key])
        return f"{key} junk JSON"
    meta[key] = json.dumps(_edit_json_object(rng, json.loads(meta[key])))
    return f"{key} edited"


def mutate_st(rng, raw: bytes, kind: str) -> tuple[str, bytes]:
    """One seeded mutation of a safetensors file: (label, bytes)."""
    h, data = split_st(raw)
    hlen = len(raw) - len(data) - 8
    op = rng.choice(["truncate", "empty", "random", "flip_header", "flip_data", "length", "dtype",
                     "dtype_same_size", "shape", "reshape", "offsets", "entries", "metadata", "metadata",
                     "metadata", "huge"])
    if op == "truncate":
        at = rng.choice([rng.randrange(8), rng.randrange(8, 8 + hlen), 8 + hlen,
                         rng.randrange(8 + hlen, len(raw)), len(raw) - 1])
        return f"truncated at {at}", raw[:at]
    if op == "empty":
        return "empty", b""
    if op == "random":
        n = rng.choice([1, 7, 8, 9, 100, 4096, 65536])
        body = rng.randbytes(n)
        if rng.random() < 0.5:                                   # a plausible length prefix over noise
            body = struct.pack("<Q", rng.randrange(1, n + 1)) + body
        return f"{len(body)} random bytes", body
    if op in ("flip_header", "flip_data"):
        lo, hi = (8, 8 + hlen) if op == "flip_header" else (8 + hlen, len(raw))
        b = bytearray(raw)
        for _ in range(rng.choice([1, 2, 8, 64])):
            b[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
        return op, bytes(b)
    if op == "length":
        n = rng.choice([0, 1, hlen - 1, hlen + 1, hlen + 8, 2**32, 2**63, 2**64 - 1])
        return f"header length {n}", struct.pack("<Q", n) + raw[8:]
    k = _tensor(h, rng)
    e = h[k]
    if op == "dtype":
        e["dtype"] = rng.choice(DTYPES)
        return f"{k} dtype {e['dtype']}", join_st(h, data)
    if op == "dtype_same_size":                                  # consistent bytes, wrong kind of number
        size = {"F32": 4, "F16": 2, "BF16": 2}.get(e["dtype"], 4)
        e["dtype"] = rng.choice({4: ["I32", "U8"], 2: ["I16", "U8"]}[size])
        if e["dtype"] == "U8":
            e["shape"] = [*e["shape"][:-1], e["shape"][-1] * size] if e["shape"] else [size]
        return f"{k} reinterpreted as {e['dtype']}", join_st(h, data)
    if op == "shape":
        s = list(e["shape"])
        e["shape"] = rng.choice([s[::-1], s[:-1], s + [1], [d * 2 for d in s], [2**40], [-1], ["a"], [],
                                 [2**31, 2**31], [0], [1.5]])
        return f"{k} shape {e['shape']}", join_st(h, data)
    if op == "reshape":                                          # same byte count, another shape
        n = 1
        for d in e["shape"]:
            n *= d
        e["shape"] = rng.choice([[n], [1, n], [n, 1], list(e["shape"])[::-1]])
        return f"{k} reshaped to {e['shape']}", join_st(h, data)
    if op == "offsets":
        a, b = e["data_offsets"]
        other = h[_tensor(h, rng)]["data_offsets"]
        e["data_offsets"] = rng.choice([[a + 4, b + 4], [b, a], [a, len(data) + 64], [-4, b], [a, a],
                                        list(other), [a, b, 0], [str(a), b]])
        return f"{k} offsets {e['data_offsets']}", join_st(h, data)
    if op == "entries":
        sub = rng.randrange(4)
        if sub == 0:
            del h[k]
            return f"{k} removed", join_st(h, data)
        if sub == 1:
            h[k + ".zz"] = dict(e)
            return f"{k} duplicated", join_st(h, data)
        if sub == 2:
            h[k.replace("weight", "wieght") if "weight" in k else k + "x"] = h.pop(k)
            return f"{k} renamed", join_st(h, data)
        h[rng.choice(["zz", "", "model.diffusion_model.zz", "\u00e9"])] = {"dtype": "F32", "shape": [1],
                                                                         "data_offsets": [0, 4]}
        return "entry added", join_st(h, data)
    if op == "huge":                                             # offsets that agree with a huge shape
        a, _ = e["data_offsets"]
        e["shape"] = rng.choice([[2**20, 2**20], [2**31, 4], [2**62, 2]])
        n = 4
        for d in e["shape"]:
            n *= d
        e["dtype"], e["data_offsets"] = "F32", [a, a + n]
        return f"{k} huge shape {e['shape']}", join_st(h, data)
    return mutate_metadata(rng, h, kind), join_st(h, data)

#----------------------------------------------------------------------------
# A .ckpt: a tiny SD1.x-layout model (family detected from keys; no metadata), pickled by torch.save.

def tiny_sd15_state_dict() -> dict:
    from lcm.pipeline import Pipeline
    from models.checkpoint import original_state_dict
    p = Pipeline.from_architecture(
        "sd15", unet=dict(model_channels=32, num_res_blocks=1, channel_mult=[1, 2], transformer_depth=[1, 0],
                          num_heads=8, context_dim=768),
        vae=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4),
        text=dict(towers=[dict(width=64, layers=1, heads=1, vocab_size=1000, act="quick_gelu", pad_token_id=999)]),
        randomize=True)
    return original_state_dict(p.unet, p.vae, p.text, "sd15")


def mutate_ckpt(rng, sd: dict, raw: bytes, tmp) -> tuple[str, bytes]:
    """Byte-level damage to the zip, or a state dict edited and pickled again."""
    op = rng.choice(["truncate", "flip", "flip", "empty", "random", "drop", "junk_value", "dtype", "shape",
                     "extra", "nested", "int_key"])
    if op == "truncate":
        at = rng.randrange(len(raw))
        return f"truncated at {at}", raw[:at]
    if op == "flip":
        b = bytearray(raw)
        for _ in range(rng.choice([1, 4, 32])):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        return "byte flips", bytes(b)
    if op == "empty":
        return "empty", b""
    if op == "random":
        return "random bytes", (b"PK\x03\x04" if rng.random() < 0.5 else b"") + rng.randbytes(rng.choice([10, 5000]))
    sd = dict(sd)
    k = rng.choice(sorted(sd))
    if op == "drop":
        del sd[k]
    elif op == "junk_value":
        sd[k] = rng.choice([1, "x", None, [torch.zeros(1)], {"a": torch.zeros(1)}])
    elif op == "dtype":
        sd[k] = sd[k].to(rng.choice([torch.int32, torch.bool, torch.uint8, torch.float16, torch.float64]))
    elif op == "shape":
        v = sd[k]
        sd[k] = rng.choice([v.flatten(), v[None], v.reshape(-1)[: max(1, v.numel() // 2)], torch.zeros(0)])
    elif op == "extra":
        sd[rng.choice(["zz", "model.diffusion_model.zz.weight", "first_stage_model.zz"])] = torch.zeros(2)
    elif op == "nested":
        return "nested", _pickled({"state_dict": {"inner": sd}}, tmp)
    else:
        sd[7] = torch.zeros(1)
    wrap = rng.random() < 0.5
    return f"{op} {k}", _pickled({"state_dict": sd} if wrap else sd, tmp)


def _pickled(obj, tmp) -> bytes:
    path = os.path.join(tmp, "pickle.tmp")
    torch.save(obj, path)
    with open(path, "rb") as f:
        return f.read()

#----------------------------------------------------------------------------


def cases(tmp):
    """(kind, label, bytes, extension) for every case, seeded."""
    rng = random.Random(SEED)
    teacher, lora = open(TEACHER, "rb").read(), open(LORA, "rb").read()
    sd = tiny_sd15_state_dict()
    ckpt_raw = _pickled({"state_dict": sd}, tmp)
    yield "teacher", "unchanged", teacher, ".safetensors"
    yield "lora", "unchanged", lora, ".safetensors"
    yield "ckpt", "unchanged", ckpt_raw, ".ckpt"
    for _ in range(N_CASES["teacher"] - 1):             # the first case of each kind: the file unchanged
        yield "teacher", *mutate_st(rng, teacher, "teacher"), ".safetensors"
    for _ in range(N_CASES["lora"] - 1):
        yield "lora", *mutate_st(rng, lora, "lora"), ".safetensors"
    for _ in range(N_CASES["ckpt"] - 1):
        yield "ckpt", *mutate_ckpt(rng, sd, ckpt_raw, tmp), ".ckpt"


def test_fuzzed_files_load_or_fail_with_one_line_naming_the_file(tmp_path):
    worker, counts, bad, peak, t0 = Worker(), {"loaded": 0, "clean": 0, "bad": 0}, [], 0, time.time()
    per_kind = {k: {"loaded": 0, "clean": 0, "bad": 0} for k in N_CASES}
    try:
        for i, (kind, label, data, ext) in enumerate(cases(str(tmp_path))):
            path = str(tmp_path / f"case{i:03d}-{kind}{ext}")
            with open(path, "wb") as f:
                f.write(data)
            outcome, etype, msg, rss = worker.run("lora" if kind == "lora" else "model", path)
            peak = max(peak, rss)
            if outcome == "clean" and (path not in msg or "\n" in msg or "allocate" in msg):
                outcome = "raised"                              # the right type, but not the project's message
            if outcome == "raised" or (label == "unchanged" and outcome != "loaded"):
                bad.append(f"case {i} ({kind}, {label}): {etype}: {msg[:300]!r}")
            key = "bad" if outcome == "raised" else outcome
            counts[key] += 1
            per_kind[kind][key] += 1
            os.remove(path)
    finally:
        worker.close()
    n = sum(counts.values())
    print(f"\nfuzzed {n} files in {time.time() - t0:.0f} s: {counts['loaded']} loaded / {counts['clean']} clean "
          f"errors / {counts['bad']} bad; per kind {per_kind}; worker peak RSS {peak / 1024:.0f} MiB "
          f"(base {worker.base_rss_kb / 1024:.0f} MiB)")
    assert n == sum(N_CASES.values())
    assert not bad, "\n".join(bad)
    assert per_kind["teacher"]["loaded"] and per_kind["lora"]["loaded"] and per_kind["ckpt"]["loaded"]
    assert peak < worker.base_rss_kb + 1024 * 1024                # no case held a GiB more than the base
