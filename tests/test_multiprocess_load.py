"""Each host loads only its slices: a 2-process job (4 CPU devices each, fsdp over all 8) loads
an HF checkpoint of over 200 MB, mostly embedding, and each process reads at most 60% of the
checkpoint's bytes (counted by the kernel: ``rchar`` in ``/proc/self/io``) and its peak resident
memory grows by at most 0.7x the checkpoint's size, while the shards it holds equal the file's.

The test spawns this file twice as a worker (`python tests/test_multiprocess_load.py PID PORT
CKPT OUT`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VOCAB, HIDDEN = 51_200, 1_024  # the embedding alone: 210 MB in float32


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


def _worker(process_id: int, port: int, ckpt: Path, out: Path) -> None:
    import jax
    import numpy as np

    from gradual_jax.distributed import DistributedConfig, maybe_initialize

    maybe_initialize(DistributedConfig(enabled=True, coordinator_address=f"127.0.0.1:{port}",
                                       num_processes=2, process_id=process_id))
    from gradual_jax.models.hf import load_hf
    from gradual_jax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=8)
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # runtime warm before measuring
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    rss0, read0 = _status_kib("VmRSS"), _rchar()
    model = load_hf(ckpt, mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(model))
    peak, read = _status_kib("VmHWM") - rss0, _rchar() - read0
    # What this process holds is the file's: compare every local shard of the embedding.
    from safetensors.numpy import load_file

    embed = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"]
    value = model.embed[...]
    shards = [(s.index, np.asarray(s.data)) for s in value.addressable_shards]
    same = all(np.array_equal(data, embed[index]) for index, data in shards)
    (out / f"worker{process_id}.json").write_text(json.dumps(
        {"read_bytes": read, "peak_growth_bytes": peak * 1024, "embed_matches": same,
         "shards": len(shards), "spec": str(value.sharding.spec)}))


def _write_checkpoint(directory: Path) -> int:
    """A llama checkpoint with random weights, tied embeddings and a tiny layer; its bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    heads, head_dim, ffn = 2, 16, 64
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "intermediate_size": ffn, "num_hidden_layers": 1,
              "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 128, "torch_dtype": "float32"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    f32 = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    p = "model.layers.0."
    tensors = {"model.embed_tokens.weight": f32(VOCAB, HIDDEN), "model.norm.weight": f32(HIDDEN),
               p + "input_layernorm.weight": f32(HIDDEN), p + "post_attention_layernorm.weight": f32(HIDDEN),
               p + "self_attn.q_proj.weight": f32(heads * head_dim, HIDDEN),
               p + "self_attn.k_proj.weight": f32(heads * head_dim, HIDDEN),
               p + "self_attn.v_proj.weight": f32(heads * head_dim, HIDDEN),
               p + "self_attn.o_proj.weight": f32(HIDDEN, heads * head_dim),
               p + "mlp.gate_proj.weight": f32(ffn, HIDDEN), p + "mlp.up_proj.weight": f32(ffn, HIDDEN),
               p + "mlp.down_proj.weight": f32(HIDDEN, ffn)}
    save_file(tensors, str(directory / "model.safetensors"))
    return (directory / "model.safetensors").stat().st_size


def test_each_process_reads_only_its_slices(tmp_path):
    from process_group import free_port, wait_all, worker_env

    ckpt = tmp_path / "ckpt"
    size = _write_checkpoint(ckpt)
    assert size > 200e6
    env = worker_env(4)
    port = free_port()
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(ckpt), str(tmp_path)],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    for i, rc in enumerate(wait_all(procs, logs, 300)):
        assert rc == 0, (tmp_path / f"worker{i}.log").read_text()[-4000:]
    for i in range(2):
        got = json.loads((tmp_path / f"worker{i}.json").read_text())
        assert got["embed_matches"] and got["shards"] == 4 and "fsdp" in got["spec"], got
        assert got["read_bytes"] <= 0.6 * size, (i, got["read_bytes"] / size)
        assert got["read_bytes"] >= 0.4 * size, (i, got["read_bytes"] / size)  # it did read its half
        assert got["peak_growth_bytes"] <= 0.7 * size, (i, got["peak_growth_bytes"] / size)
        print(f"process {i}: read {got['read_bytes'] / size:.3f}x, peak memory growth "
              f"{got['peak_growth_bytes'] / size:.3f}x of the {size / 1e6:.0f} MB checkpoint")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
