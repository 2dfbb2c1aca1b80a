"""`sharding.place` across two processes (gloo, 4 CPU devices each): 30 round trips of a 30-leaf
state between an fsdp=8 layout and a 4 x 2 inference layout finish. A batched `jax.device_put`
of the same trees deadlocked here (the processes entered different leaves' collectives in
different orders until gloo timed out), which is the hang `place` exists to prevent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from process_group import free_port  # noqa: E402

WORKER = r'''
import os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_seconds=20)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gradual_jax.sharding import place
devs = np.asarray(jax.devices())
train = Mesh(devs.reshape(1, 8, 1), ("data", "fsdp", "tensor"))
inference = Mesh(devs.reshape(4, 1, 2), ("data", "fsdp", "tensor"))
shapes = [(64, 128), (128, 64), (32, 64), (64,), (128, 256), (256, 128)] * 5
def spec(shape, axis):
    return P(axis) if len(shape) == 1 else P(None, axis) if axis == "fsdp" else P(axis, None)
want = [np.arange(np.prod(s), dtype=np.float32).reshape(s) for s in shapes]
tree = [jax.make_array_from_callback(s, NamedSharding(train, spec(s, "fsdp")), lambda i, w=w: w[i])
        for s, w in zip(shapes, want)]
to_inference = [NamedSharding(inference, spec(s, "tensor")) for s in shapes]
to_train = [NamedSharding(train, spec(s, "fsdp")) for s in shapes]
for _ in range(30):
    tree = place(place(tree, to_inference), to_train)
for x, w in zip(tree, want):
    for shard in x.addressable_shards:
        assert np.array_equal(np.asarray(shard.data), w[shard.index])
print("round trips done", flush=True)
'''


def test_place_reshards_many_leaves_across_two_processes_without_deadlock(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("the two-process reshard did not finish in 180 s")
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2000:] for o in outs)
    assert all("round trips done" in o for o in outs)
