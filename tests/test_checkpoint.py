"""Checkpoints leave the never-updated subtrees out of every step and restore them from
WORKDIR/frozen/; steps saved whole (before that layout) restore as saved."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unimedi_jax.objective import optim
from unimedi_jax.train import checkpoint

FROZEN = [("params", "text", "embeddings"), ("params", "text", "layer_0")]


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))  # a sharded leaf, as under the training mesh
    put = lambda *shape: jax.device_put(rng.normal(size=shape).astype(np.float32),
                                        rows if shape[0] % len(jax.devices()) == 0 else None)
    return {"params": {"vision": {"w": put(8, 3)},
                       "text": {"embeddings": {"table": put(16, 4)}, "layer_0": {"w": put(4, 4)},
                                "layer_1": {"w": put(4, 4)}}},
            "opt_state": {"mu": put(8, 3)}, "step": jax.device_put(np.int32(seed))}


def _abstract(state: dict):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_steps_leave_the_frozen_subtrees_out_and_restore_them(tmp_path):
    state = _state(0)
    ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, frozen=FROZEN)
    with pytest.raises(RuntimeError, match="save_frozen"):
        ckpt.save(1, state)
    ckpt.save_frozen(state)
    ckpt.save(1, state, {"position": 3})
    saved = ckpt.manager.item_metadata(1)["state"]
    assert sorted(saved["params"]["text"]) == ["layer_1"]  # only what trains
    # The frozen store is written once: a later state's frozen values do not replace it.
    later = _state(1)
    ckpt.save_frozen(later)
    ckpt.save(2, later)
    restored, data, _ = ckpt.restore(1, _abstract(state))
    _equal(restored, state)
    assert data == {"position": 3}
    leaf = restored["params"]["text"]["embeddings"]["table"]
    assert leaf.sharding == state["params"]["text"]["embeddings"]["table"].sharding
    two, _, _ = ckpt.restore(2, _abstract(later))
    _equal(two["params"]["text"]["layer_1"], later["params"]["text"]["layer_1"])
    _equal(two["params"]["text"]["embeddings"], state["params"]["text"]["embeddings"])
    _equal(ckpt.restore_host(1), jax.tree.map(np.asarray, state))
    ckpt.close()
    # load_pretrained's reader knows nothing of the config: the store says what was left out.
    reader = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
    _equal(reader.restore_host(1)["params"], jax.tree.map(np.asarray, state["params"]))


def test_a_step_saved_whole_restores_as_saved(tmp_path):
    state = _state(0)
    old = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)  # no frozen paths
    old.save(1, state)
    old.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, frozen=FROZEN)
    restored, _, _ = ckpt.restore(1, _abstract(state))
    _equal(restored, state)
    assert not os.path.exists(tmp_path / checkpoint.FROZEN_DIR)
    _equal(ckpt.restore_host(1), jax.tree.map(np.asarray, state))


def test_a_missing_frozen_store_is_a_clear_error(tmp_path):
    state = _state(0)
    ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, frozen=FROZEN)
    ckpt.save_frozen(state)
    ckpt.save(1, state)
    ckpt.close()
    os.rename(tmp_path / checkpoint.FROZEN_DIR, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="copy that folder back"):
        checkpoint.Checkpointer(str(tmp_path), frozen=FROZEN).restore(1, _abstract(state))


def test_frozen_paths_are_the_subtrees_the_optimiser_never_updates():
    params = jax.tree.map(np.asarray, _state(0)["params"])
    params["logit_scale"] = np.float32(1.0)
    config = ml_collections.ConfigDict({"model": {"text": {"trainable_layers": 1}},
                                        "objective": {"clip": {"learnable": True}}})
    got = optim.frozen_paths(params, config)
    mask = optim.trainable_mask(params, config)
    assert got == [("text", "embeddings"), ("text", "layer_0")]
    for path in got:  # every leaf under a frozen path is frozen, and every frozen leaf is under one
        assert not any(jax.tree.leaves(checkpoint._get(mask, path)))
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    frozen_leaves = [tuple(k.key for k in path) for path, trains in flat if not trains]
    assert all(any(leaf[:len(p)] == p for p in got) for leaf in frozen_leaves)
    config.objective.clip.learnable = False
    assert ("logit_scale",) in optim.frozen_paths(params, config)
    config.model.text.trainable_layers = -1
    assert optim.frozen_paths(params, config) == [("logit_scale",)]


@pytest.mark.parametrize("method", ["joint", "drasclr"])
def test_the_other_methods_states_checkpoint_and_restore_sharded(method, tmp_path):
    """A Joint or DrasCLR train state (its heads, DrasCLR's teacher, the optimiser state),
    sharded on the training mesh as the trainer shards it, restores exactly and with its
    shardings; nothing in it is frozen (no text tower)."""
    import importlib

    from unimedi_jax.objective import methods
    from unimedi_jax.train import sharding as shd

    config = importlib.import_module(f"configs.pretrain_{method}").get_config("test")
    setup = methods.make_setup(config)
    mesh = shd.make_mesh(config.mesh)
    abstract = jax.eval_shape(setup.init, jax.random.key(0))
    shardings = shd.state_shardings(mesh, abstract)
    state = jax.jit(setup.init, out_shardings=shardings)(jax.random.key(0))
    assert optim.frozen_paths(abstract["params"], config) == []
    assert method in state["params"] and ("teacher" in state) == (method == "drasclr")
    ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False, frozen=[])
    ckpt.save_frozen(state)
    ckpt.save(3, state, {"position": 5})
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored, data, _ = ckpt.restore(3, target)
    ckpt.close()
    _equal(restored, state)
    assert data == {"position": 5}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding == want.sharding
