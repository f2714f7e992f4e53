"""The training run shards its data by the mesh's 'data' axis, not by process (simulated hosts)."""

import functools

import jax
import ml_collections
import pytest

from lct_jax.data import loader
from lct_jax.sharding import make_mesh
from lct_jax.train.config_base import SKIP_FIELDS
from lct_jax.train.run import pipeline_options

CONFIG = ml_collections.ConfigDict(
    dict(seed=0, data=dict(batch_size=8, shuffle=False, num_workers=0, strict=False, **SKIP_FIELDS))
)


@pytest.mark.parametrize(
    "data,seq,want",
    [
        (1, 8, (0, 1, 8)),  # seq spans both hosts: both read shard 0 and build the same 8 full rows
        (2, 4, (1, 2, 4)),  # data over hosts: host 1 reads shard 1 of 2, half the rows
    ],
)
def test_hosts_sharing_rows_read_the_same_shard(monkeypatch, data, seq, want):
    # pretend to be process 1 of 2, owning devices 4..7
    fake = functools.partial(loader.mesh_data_shard, process_index=1, process_of=lambda d: d.id // 4)
    monkeypatch.setattr(loader, "mesh_data_shard", fake)
    opts = pipeline_options(CONFIG, make_mesh(data=data, seq=seq, model=1, devices=jax.devices()))
    assert (opts.shard_index, opts.shard_count, opts.batch_size) == want
    assert opts.seq_shards == seq
