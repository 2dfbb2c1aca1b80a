"""Mesh construction, the logical-axis rules, placement of params, optimizer state and batches."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from gradual_jax import sharding as S
from gradual_jax.models.transformer import ModelConfig, init_model

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def test_make_mesh_fills_and_uses_auto_axes():
    mesh = S.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(S.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(S.make_mesh(devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices"):
        S.make_mesh(3, 2, 2)
    with pytest.raises(ValueError, match="do not divide"):
        S.make_mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        S.make_mesh(-1, -1, 1)


def test_partition_spec_rules():
    mesh = S.make_mesh(2, 2, 2)
    assert S.param_partition_spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert S.param_partition_spec(("embed", "heads", "head_dim"), mesh) == P("fsdp", "tensor")
    assert S.param_partition_spec(("batch", None), mesh) == P(("data", "fsdp"))
    # A dim that does not divide by an axis drops that axis.
    assert S.param_partition_spec(("embed", "kv_heads", "head_dim"), mesh, shape=(32, 1, 8)) == P("fsdp")
    assert S.param_partition_spec(("vocab", "embed"), mesh, shape=(49, 32)) == P(None, "fsdp")
    # A mesh axis is used at most once per tensor.
    assert S.param_partition_spec(("mlp", "heads"), mesh) == P("tensor")
    # Axes of size 1 are left out.
    assert S.param_partition_spec(("vocab", "embed"), S.make_mesh(8, 1, 1)) == P()
    with pytest.raises(KeyError, match="'nope' has no sharding rule"):
        S.param_partition_spec(("nope",), mesh)


def test_shard_model_and_optimizer_state():
    mesh = S.make_mesh(2, 2, 2)
    model = S.shard_model(init_model(TINY), mesh)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers[0].attn.q.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.layers[0].mlp.down.kernel[...].sharding.spec == P("tensor", "fsdp")
    opt = nnx.eval_shape(lambda m: nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param), model)
    shardings = S.state_shardings(nnx.state(opt), mesh)
    mu = shardings["opt_state"][0]["mu"]
    assert mu["layers"][0]["attn"]["q"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert shardings["step"].get_value().spec == P()


def test_global_batch_and_divisibility():
    mesh = S.make_mesh(2, 2, 2)
    local = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    out = S.global_batch(local, mesh)["input_ids"]
    assert out.shape == (8, 5) and out.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(out), local["input_ids"])
    assert S.process_rows(8) == slice(0, 8)  # one process feeds every row
    with pytest.raises(ValueError, match=r"batch dim of 'x' 6 does not divide over the data axes \(data=2, fsdp=2; 4 ways\)"):
        S.global_batch({"x": np.zeros((6, 3))}, mesh)
