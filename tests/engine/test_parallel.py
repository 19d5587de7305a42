"""The tensor-parallel plumbing that one process can check: KV-head shards, how a cache finds
its shard (and refuses when it cannot tell), which rank decides what for HeteroCache's clusters,
and merging the ranks' memory reports. The two-process runs are in test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from heterocache import FullKVCache, HeteroCache
from heterocache._compat import cache_kwarg
from heterocache.engine.memory import LayerMemory, MemoryReport, merge_reports
from heterocache.engine.parallel import KVShard, TensorParallelError, kv_head_shard
from heterocache.methods.heterocache.clusters import ClusterLayout
from heterocache.profile.testing import toy_profile

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def test_a_contiguous_shard_holds_its_slice_of_the_heads():
    shard = KVShard.contiguous(1, 2, 4)
    assert list(shard.heads) == [2, 3] and shard.num_local == 2 and shard.sharded
    assert shard.owns(3) and not shard.owns(1) and shard.local(3) == 1
    assert [shard.rank_of(h) for h in range(4)] == [0, 0, 1, 1]
    with pytest.raises(IndexError):
        shard.local(0)
    with pytest.raises(TensorParallelError):
        KVShard.contiguous(0, 3, 4)  # 4 heads do not split over 3 ranks


def test_one_process_collectives_are_no_ops():
    shard = KVShard.single(4)
    t = torch.arange(3.0)
    assert shard.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(3.0))
    assert shard.all_gather_object({"a": 1}) == [{"a": 1}]


def test_every_head_here_is_a_single_shard_whatever_the_process_group():
    config = tiny_model("llama", **TOY_SHAPE).config
    shard = kv_head_shard(None, config=config, local_heads=4)
    assert shard == KVShard.single(4) and not shard.sharded


def test_fewer_heads_than_the_config_without_a_mesh_or_process_group_is_refused():
    config = tiny_model("llama", **TOY_SHAPE).config
    with pytest.raises(TensorParallelError, match="2 of the config's 4 KV heads.*torch.distributed is not"):
        kv_head_shard(None, config=config, local_heads=2)


def test_a_cache_refuses_a_shard_that_does_not_match_the_keys():
    model = tiny_model("llama", **TOY_SHAPE)
    cache = FullKVCache()
    cache.kv_shard = KVShard.contiguous(0, 2, 4)  # says 2 heads, the layer has 4
    with pytest.raises(TensorParallelError, match="hold 4 KV heads"), torch.no_grad():
        model(torch.randint(1, 256, (1, 12)), **cache_kwarg(model, cache))


def test_a_cache_finds_and_reports_its_heads():
    model = tiny_model("llama", **TOY_SHAPE)
    cache = HeteroCache(toy_profile(), budget=0.5)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 40)), **cache_kwarg(model, cache))
    assert cache.kv_heads == range(4) and cache.policy.kv_shard is cache.kv_shard
    report = cache.memory_report(aggregate=True)  # no sharding: the same as not aggregating
    assert report.ranks == 1 and all(layer.kv_heads == [0, 1, 2, 3] for layer in report.layers)


def test_a_profile_of_another_head_count_is_refused_when_the_shard_is_bound():
    policy = HeteroCache(toy_profile(), budget=0.5).policy
    with pytest.raises(TensorParallelError, match="profile describes 4 KV heads per layer, the model has 8"):
        policy.bind_kv_shard(KVShard.contiguous(0, 2, 8))


def test_one_process_decides_and_refills_every_cluster_itself():
    layout = ClusterLayout.build({0: [1, 2]}, KVShard.single(4))
    assert layout.own == [0] and layout.targets == layout.local == [0, 1]
    assert not layout.exchange and layout.local_src is None


def test_a_cluster_across_two_shards_exchanges_its_decisions():
    clusters = {0: [1, 2]}  # pivot 0 and satellite 1 on rank 0, satellite 2 on rank 1
    rank0 = ClusterLayout.build(clusters, KVShard.contiguous(0, 2, 4))
    rank1 = ClusterLayout.build(clusters, KVShard.contiguous(1, 2, 4))
    assert rank0.cross == rank1.cross == [1] and rank0.exchange and rank1.exchange
    # Rank 0 scores the pivot and computes both satellites' refills, sends satellite 2's.
    assert rank0.own == [0] and rank0.targets == [0, 1] and rank0.local == [0]
    assert rank0.cross_src == [1] and rank0.cross_dst == [0] and rank0.local_src == [0]
    # Rank 1 scores nothing and takes satellite 2's refill from the exchange.
    assert rank1.own == [] and rank1.targets == [] and rank1.local == [1]
    assert rank1.local_src == [0]  # row 0 of cat([no targets, cross refills])


def test_a_rank_outside_the_shards_clusters_does_not_exchange():
    layout = ClusterLayout.build({0: [1]}, KVShard.contiguous(1, 2, 4))
    assert not (layout.own or layout.local or layout.exchange)


def _layer(heads, tokens, roles, device_bytes=100):
    return LayerMemory(layer_idx=0, device_bytes=device_bytes, device_used_bytes=10 * sum(map(sum, tokens)),
                       host_bytes=5, dynamic_bytes=40, stored_tokens=tokens, roles=roles, kv_heads=heads,
                       device="cpu")


def test_merged_reports_concatenate_heads_in_global_order_and_sum_bytes():
    rank1 = MemoryReport([_layer([2, 3], [[3, 4], [5, 6]], ["anchor", "pivot"])])
    rank0 = MemoryReport([_layer([0, 1], [[1, 2], [7, 8]], ["volatile", "satellite"])])
    merged = merge_reports([rank1, rank0])
    layer = merged.layers[0]
    assert merged.ranks == 2 and layer.kv_heads == [0, 1, 2, 3]
    assert layer.stored_tokens == [[1, 2, 3, 4], [7, 8, 5, 6]]
    assert layer.roles == ["volatile", "satellite", "anchor", "pivot"]
    assert (layer.device_bytes, layer.host_bytes, layer.dynamic_bytes) == (200, 10, 80)
    assert merged.by_role()["pivot"]["tokens"] == 10


def test_reports_of_different_layers_are_not_merged():
    other = MemoryReport([_layer([2, 3], [[3, 4]], ["anchor", "pivot"])])
    other.layers[0].layer_idx = 1
    with pytest.raises(ValueError, match="different layers"):
        merge_reports([MemoryReport([_layer([0, 1], [[1, 2]], ["anchor", "pivot"])]), other])


def test_unequal_or_misplaced_shards_are_refused():
    from heterocache.engine.parallel import KVShard, TensorParallelError

    with pytest.raises(TensorParallelError, match="only equal contiguous shards"):
        KVShard(0, 2, 0, 3, 4)  # 3 of 4 heads on rank 0
    with pytest.raises(TensorParallelError, match="only equal contiguous shards"):
        KVShard(1, 2, 0, 2, 4)  # rank 1 holding rank 0's heads
    assert KVShard(1, 2, 2, 4, 4).num_local == 2
