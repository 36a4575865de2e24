"""``adapruner export``: a saved model (an export of ``prune`` or ``search``, a transformers checkpoint or a built-in
model) as one GGUF file that llama.cpp runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from ..models import BUILTIN_MODELS, builtin_checkpoint
    from ..to_gguf import check_quant, read_layout, write_gguf

    check_quant(args.quant)
    folder = builtin_checkpoint(args.folder) if args.folder in BUILTIN_MODELS else Path(args.folder)
    layout = read_layout(folder)  # every refusal before any weight is read
    out = write_gguf(folder, args.out, args.quant)
    print(f"wrote   {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant}, llama.cpp architecture {layout.arch})")
    print(f"run     llama-cli -m {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` command's flags."""
    from ..to_gguf import GGUF_TYPES

    p = sub.add_parser("export", help="write a saved model as a GGUF file for llama.cpp, Ollama and LM Studio")
    p.add_argument("folder", metavar="MODEL_DIR",
                   help="a folder written by prune/search --out, a transformers checkpoint, or a built-in model name")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="file format (default: gguf)")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write")
    p.add_argument("--quant", choices=GGUF_TYPES, default="f16",
                   help="weight type: f32, f16, bf16 written here; q8_0, q4_k_m by llama.cpp's quantizer "
                   "(default: f16)")
    p.set_defaults(func=cmd_export)
