"""GGUF -> HF checkpoint directory, and a check of our GGUF loading against transformers'.

    python -m gradual_jax.models.convert SRC.gguf OUT_DIR [--dtype float32]
        writes config.json, model.safetensors and the tokenizer files to OUT_DIR.
    python -m gradual_jax.models.convert SRC.gguf --verify [--json FILE]
        prints (and optionally writes) a JSON record: load time and peak host memory of
        `load_gguf` in a fresh process, top-1 agreement and max |logit diff| against transformers'
        own GGUF loading on a real text, and our greedy continuation of a factual prompt.

Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gradual_jax.models.errors import CheckpointError

# Public-domain prose (Dickens, "A Tale of Two Cities", 1859), long enough for a few hundred tokens.
DEFAULT_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things "
    "in general were settled for ever."
)
DEFAULT_PROMPT = "The capital of France is"


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write the GGUF file `src` as an HF checkpoint directory (weights, config, tokenizer)."""
    from gradual_jax.models.gguf import load_gguf
    from gradual_jax.models.hf import load_tokenizer, save_hf

    model = load_gguf(src, dtype=dtype)
    tokenizer = load_tokenizer(src)
    return save_hf(model, out_dir, tokenizer=tokenizer)


def transformers_gguf_model(src: str | os.PathLike) -> Any:
    """transformers' own reading of a GGUF file as a float32 PyTorch causal LM.

    Uses transformers' GGUF config parsing and `load_gguf_checkpoint` (its dequantization and
    q/k un-permutation); `from_pretrained(gguf_file=...)` wraps the same steps but also requires
    `accelerate`, which this project does not depend on.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(src).resolve()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"transformers' GGUF load left missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model.eval()


def greedy_continuation(model: Any, tokenizer: Any, prompt: str, steps: int = 8) -> str:
    """Our model's greedy continuation of `prompt`: a check, not a sampler. Each step runs the
    whole sequence; the buffer has a fixed length so one compilation serves every step, and the
    causal mask keeps the unfilled tail from touching the positions read."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n = len(ids)
    buf = np.zeros((1, n + steps), np.int32)
    buf[0, :n] = ids
    forward = nnx.jit(lambda m, x: m(x))
    for i in range(steps):
        logits = forward(model, jnp.asarray(buf))
        buf[0, n + i] = int(jnp.argmax(logits[0, n + i - 1]))
    return tokenizer.decode(buf[0, n:].tolist())


def compare_with_transformers(src: str | os.PathLike, text: str = DEFAULT_TEXT) -> dict[str, Any]:
    """Our float32 logits on `text` against transformers' GGUF loading of the same file.

    Returns `tokens`, `top1_agreement` (fraction of positions whose argmax agrees),
    `max_abs_logit_diff`, `mean_abs_logit_diff`, `max_abs_logit` (for scale).
    """
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from gradual_jax.models.gguf import load_gguf
    from gradual_jax.models.hf import load_tokenizer

    tokenizer = load_tokenizer(src)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    forward = nnx.jit(lambda m, x: m(x))
    ours = np.asarray(forward(load_gguf(src), jnp.asarray([ids], jnp.int32))[0])
    with torch.no_grad():
        theirs = transformers_gguf_model(src)(torch.tensor([ids])).logits[0].float().numpy()
    diff = np.abs(ours - theirs)
    return {
        "tokens": len(ids),
        "top1_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(theirs).max()),
    }


def _measure_load_here(src: str, dtype: str) -> dict[str, Any]:
    import jax

    from gradual_jax.models.gguf import load_gguf

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = load_gguf(src, dtype=dtype)
    jax.block_until_ready(jax.tree.leaves(model))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"load_s": round(seconds, 3), "rss_before_load_mib": round(before / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1), "params": model.config.num_params(),
            "file_mib": round(Path(src).stat().st_size / 2**20, 1), "dtype": dtype}


def measure_load(src: str | os.PathLike, *, dtype: str = "float32") -> dict[str, Any]:
    """Wall time and peak resident memory (ru_maxrss) of `load_gguf(src)` in a fresh process.

    `rss_before_load_mib` is the process after importing jax and this package, so the load's own
    cost is the difference.
    """
    cmd = [sys.executable, "-m", "gradual_jax.models.convert", os.fspath(src), "--measure-load",
           "--dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def verify(src: str | os.PathLike, *, text: str = DEFAULT_TEXT,
           prompt: str = DEFAULT_PROMPT) -> dict[str, Any]:
    """The full verification record of `src`: `measure_load` + `compare_with_transformers` +
    our greedy continuation of `prompt`."""
    from gradual_jax.models.gguf import load_gguf
    from gradual_jax.models.hf import load_tokenizer

    record: dict[str, Any] = {"file": os.fspath(src)}
    record["load"] = measure_load(src)
    record["vs_transformers"] = compare_with_transformers(src, text)
    record["prompt"] = prompt
    record["greedy_continuation"] = greedy_continuation(load_gguf(src), load_tokenizer(src), prompt)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradual_jax.models.convert",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a Llama-architecture .gguf file")
    parser.add_argument("out_dir", nargs="?", help="HF checkpoint directory to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--verify", action="store_true",
                        help="measure load time/memory and compare logits with transformers")
    parser.add_argument("--json", help="with --verify: also write the record to this file")
    parser.add_argument("--measure-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.out_dir or args.verify or args.measure_load):
        parser.error("give OUT_DIR, --verify, or both")
    try:
        if args.measure_load:
            print(json.dumps(_measure_load_here(args.src, args.dtype)))
            return 0
        if args.out_dir:
            out = convert(args.src, args.out_dir, dtype=args.dtype)
            print(f"wrote {out}")
        if args.verify:
            record = verify(args.src)
            print(json.dumps(record, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
