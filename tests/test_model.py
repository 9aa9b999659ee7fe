"""The model's forward against torchrec's, and the process heap settings."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from torchrec.models.dlrm import DLRM, DLRM_DCN, InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.config import ModelConfig
from dlrm.schema.declared import load_schema
from dlrm.schema.features import NUM_DENSE, SPARSE_NAMES
from dlrm.train.model import KeyOrderInteractionArch, build_model, stack_pooled

CARDS = [5 + i for i in range(len(SPARSE_NAMES))]


def _batch(batch: int, seed: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(SPARSE_NAMES) * batch,), generator=gen)
    ids = torch.cat([torch.randint(0, CARDS[i // batch], (int(n),), generator=gen)
                     for i, n in enumerate(lengths)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_NAMES), values=ids,
                                              lengths=lengths)
    return torch.rand(batch, NUM_DENSE, generator=gen), kjt


@pytest.mark.parametrize("interaction, reference", [("dot", DLRM), ("dcn", DLRM_DCN)])
def test_lookup_first_forward_and_backward_equal_torchrecs(interaction, reference):
    """Same logits and the same gradient of every parameter as torchrec's own class,
    loaded with the same weights (the lookup-first order and the view change no math)."""
    cfg = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8],
                      over_arch_layer_sizes=[16, 1], interaction=interaction,
                      dcn_num_layers=2, dcn_low_rank_dim=4)
    torch.manual_seed(0)
    ours = build_model(cfg, load_schema("criteo").features(), CARDS, torch.device("cpu"),
                       torch.device("cpu")).model
    assert type(ours) is not reference and isinstance(ours, reference)
    kwargs = {"dcn_num_layers": 2, "dcn_low_rank_dim": 4} if interaction == "dcn" else {}
    theirs = reference(
        embedding_bag_collection=copy.deepcopy(ours.sparse_arch.embedding_bag_collection),
        dense_in_features=NUM_DENSE, dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1], **kwargs)
    theirs.load_state_dict(ours.state_dict())  # same keys: checkpoints interchange
    dense, kjt = _batch(6, seed=1)
    logits = [model(dense, kjt) for model in (ours, theirs)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    for out in logits:
        out.square().sum().backward()
    grads = [dict(m.named_parameters()) for m in (ours, theirs)]
    assert grads[0].keys() == grads[1].keys()
    for name, p in grads[0].items():
        torch.testing.assert_close(p.grad, grads[1][name].grad, rtol=0, atol=0, msg=name)


def test_stack_pooled_views_keys_in_order_and_reorders_others():
    names, batch, dim = ["a", "b", "c"], 4, 2
    per_key = {k: torch.full((batch, dim), float(i)) + torch.arange(batch)[:, None] / 10
               for i, k in enumerate(names)}
    expected = torch.stack([per_key[k] for k in names], dim=1)  # [B, F, D]

    values = torch.cat([per_key[k] for k in names], dim=1)
    in_order = KeyedTensor(keys=names, length_per_key=[dim] * 3, values=values)
    out = stack_pooled(in_order, names, dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.data_ptr() == values.data_ptr()  # a view, no copy

    shuffled = ["c", "a", "b"]  # a plan mixing sharding types returns keys in this kind of order
    mixed = KeyedTensor(keys=shuffled, length_per_key=[dim] * 3,
                        values=torch.cat([per_key[k] for k in shuffled], dim=1))
    torch.testing.assert_close(stack_pooled(mixed, names, dim), expected, rtol=0, atol=0)


def test_dot_interaction_reads_features_in_any_key_order():
    """A sharded collection returns features grouped by owning rank: the interaction on
    that KeyedTensor equals torchrec's on the features in model order, forward and
    backward (the gradient reaches each feature's own columns)."""
    names, batch, dim = [f"f{i}" for i in range(5)], 3, 4
    keys = ["f3", "f0", "f4", "f1", "f2"]
    torch.manual_seed(0)
    dense = torch.randn(batch, dim, requires_grad=True)
    per_key = {k: torch.randn(batch, dim, requires_grad=True) for k in names}
    inter = KeyOrderInteractionArch(len(names), names)

    ours = inter(dense, KeyedTensor(keys=keys, length_per_key=[dim] * 5,
                                    values=torch.cat([per_key[k] for k in keys], dim=1)))
    theirs = InteractionArch(len(names))(dense, torch.stack([per_key[k] for k in names], 1))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(theirs)
    grads = [torch.autograd.grad(out, [dense, *per_key.values()], upstream)
             for out in (ours, theirs)]
    for g_ours, g_theirs in zip(*grads, strict=True):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
    # a [B, F, D] tensor in model order (bench_train's ceiling) takes torchrec's forward
    torch.testing.assert_close(inter(dense, torch.stack([per_key[k] for k in names], 1)),
                               theirs, rtol=0, atol=0)


_HEAP_PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from dlrm.utils.heap import keep_freed_memory
    keep_freed_memory()

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

def cycle():  # 25 arrays of 8 MiB, written, then all freed
    arrays = [np.ones(1 << 20) for _ in range(25)]
    del arrays

start = rss_mib()
cycle()
kept = rss_mib() - start
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_keeps_the_heap_and_stops_page_faults_on_reuse():
    """glibc's default hands the 200 MiB back to the kernel when the arrays are freed, and
    writing them again faults on every page; kept, the second cycle reuses the heap."""
    kept, faults = {}, {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], cwd=REPO, check=True,
                             capture_output=True, text=True)
        kept[mode], faults[mode] = map(float, out.stdout.split())
    assert kept["default"] < 50, kept  # MiB still resident after the free
    assert kept["keep"] > 150, kept
    assert faults["keep"] * 10 < faults["default"], faults
